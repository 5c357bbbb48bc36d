/// Counters of one upstream worker (one connection): responses by class,
/// failures by kind, bytes each way.
///
/// A value type: the worker that owns the connection updates its own copy after
/// each exchange with ``record(_:)-(ForwardResult)`` or ``record(_:)-(UpstreamError)``,
/// and publishes it however the stats snapshot wants.
public struct UpstreamStats: Sendable, Hashable {
    /// Exchanges that ended with a response (any status).
    public private(set) var responses = 0
    /// Responses by status class: index 0 is 1xx (unused: interim responses are
    /// not final), 1 is 2xx, ..., 4 is 5xx.
    public private(set) var responsesByClass: [Int] = [0, 0, 0, 0, 0]
    /// Failed exchanges by kind.
    public private(set) var errors: [UpstreamError.Kind: Int] = [:]
    /// Request body bytes sent to the backend.
    public private(set) var bytesOut = 0
    /// Response body bytes received from the backend.
    public private(set) var bytesIn = 0

    public init() {}

    public var responses2xx: Int { responsesByClass[1] }
    public var responses3xx: Int { responsesByClass[2] }
    public var responses4xx: Int { responsesByClass[3] }
    public var responses5xx: Int { responsesByClass[4] }
    /// Failed exchanges of all kinds.
    public var errorCount: Int { errors.values.reduce(0, +) }

    public mutating func record(_ result: ForwardResult) {
        responses += 1
        let index = min(max(result.statusClass - 1, 0), 4)
        responsesByClass[index] += 1
        bytesOut += result.requestBodyBytes
        bytesIn += result.responseBodyBytes
    }

    public mutating func record(_ error: UpstreamError) {
        errors[error.kind, default: 0] += 1
        bytesOut += error.requestBodyBytes
        bytesIn += error.responseBodyBytes
    }
}

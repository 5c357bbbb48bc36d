import NIOHTTP1

/// What the server records about each answered request: the metrics (when
/// `metrics` is on) and the access log (when `access_log` is on).
final class RequestObserver: Sendable {
    let metrics: ServerMetrics?
    let accessLog: AccessLogQueue?

    init(metrics: ServerMetrics?, accessLog: AccessLogQueue?) {
        self.metrics = metrics
        self.accessLog = accessLog
    }

    /// Whether anything is recorded (else the server skips the clock reads).
    var isActive: Bool { metrics != nil || accessLog != nil }

    func observe(_ record: RequestRecord) {
        if let metrics {
            metrics.count(record.status, pool: record.pool)
            if let served = record.served, let pool = metrics.pool(record.pool) {
                pool.record(worker: served.worker, queued: served.queued, ran: served.ran, total: record.total)
            }
        }
        accessLog?.write(record.accessLogLine(at: .now))
    }
}

/// What the server knows about one answered request, for the metrics and the access log.
struct RequestRecord {
    var method: HTTPMethod
    var uri: String
    var requestID: String
    var status: HTTPResponseStatus
    var pool: PoolName
    /// The worker that ran it, when one did.
    var served: Served?
    /// From the whole request received to the answer ready.
    var total: Duration
    /// Request body bytes read.
    var bytesIn: Int
    /// Response body bytes written.
    var bytesOut: Int
}

/// Which worker served a request, and how long it waited and ran.
public struct Served: Sendable, Hashable {
    public var worker: Int
    /// The backend's name, for the upstream pool.
    public var backend: String?
    public var queued: Duration
    public var ran: Duration

    public init(worker: Int, backend: String? = nil, queued: Duration, ran: Duration) {
        self.worker = worker
        self.backend = backend
        self.queued = queued
        self.ran = ran
    }
}

/// One HTTP backend server behind an upstream pool: a name and where it listens.
///
/// Only plain `http://host[:port][/]` URLs are accepted. TLS to backends is not
/// supported, and neither is a path prefix, user info, a query or a fragment:
/// each is refused with a ``BackendURLError`` naming the problem, rather than
/// half-honoured.
public struct Backend: Sendable, Hashable, CustomStringConvertible {
    /// The name used in stats, logs and error bodies; `host:port` unless configured.
    public let name: String
    /// Where it listens; never with a prefix.
    public let address: HTTPBaseURL

    /// The URL as configured, e.g. `http://127.0.0.1:9001`.
    public var url: String { address.url }
    /// The host to connect to: a DNS name or an IP literal (IPv6 without brackets).
    public var host: String { address.host }
    public var port: Int { address.port }
    /// The value for a `Host` header naming this backend.
    public var hostHeader: String { address.hostHeader }

    public var description: String { "\(name) (\(url))" }

    /// Parses `url` and names the backend `name`, or `host:port` when `name` is nil or empty.
    ///
    /// - Throws: ``BackendURLError`` with a message saying what is wrong and what is accepted.
    public init(name: String? = nil, url: String) throws(BackendURLError) {
        let parsed: HTTPBaseURL
        do {
            parsed = try HTTPBaseURL(url)
        } catch {
            throw BackendURLError(url: url, reason: error.reason)
        }
        guard parsed.prefix.isEmpty else {
            throw BackendURLError(url: url, reason: "a path is not supported in a backend URL ('\(parsed.prefix)')")
        }
        self.address = parsed
        if let name, !name.isEmpty {
            self.name = name
        } else {
            self.name = parsed.authority
        }
    }
}

/// A backend URL that cannot be used, and why.
public struct BackendURLError: Error, Sendable, Hashable, CustomStringConvertible {
    public let url: String
    public let reason: String
    public var description: String { "invalid backend URL '\(url)': \(reason)" }
}

/// One HTTP backend server behind an upstream pool: a name and where it listens.
///
/// Only plain `http://host[:port][/]` URLs are accepted. TLS to backends is not
/// supported, and neither is a path prefix, user info, a query or a fragment:
/// each is refused with a ``BackendURLError`` naming the problem, rather than
/// half-honoured.
public struct Backend: Sendable, Hashable, CustomStringConvertible {
    /// The name used in stats, logs and error bodies; `host:port` unless configured.
    public let name: String
    /// The URL as configured, e.g. `http://127.0.0.1:9001`.
    public let url: String
    /// The host to connect to: a DNS name or an IP literal (IPv6 without brackets).
    public let host: String
    public let port: Int

    /// The value for a `Host` header naming this backend (IPv6 in brackets, port
    /// omitted when it is 80).
    public var hostHeader: String {
        let literal = host.contains(":") ? "[\(host)]" : host
        return port == 80 ? literal : "\(literal):\(port)"
    }

    public var description: String { "\(name) (\(url))" }

    /// Parses `url` and names the backend `name`, or `host:port` when `name` is nil or empty.
    ///
    /// - Throws: ``BackendURLError`` with a message saying what is wrong and what is accepted.
    public init(name: String? = nil, url: String) throws(BackendURLError) {
        let (host, port) = try Backend.parse(url)
        self.url = url
        self.host = host
        self.port = port
        let defaultName = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        if let name, !name.isEmpty {
            self.name = name
        } else {
            self.name = defaultName
        }
    }

    private static func parse(_ url: String) throws(BackendURLError) -> (host: String, port: Int) {
        func fail(_ reason: String) -> BackendURLError { BackendURLError(url: url, reason: reason) }
        let trimmed = url.trimmingASCIIWhitespace()
        guard let schemeEnd = trimmed.firstRange(of: "://") else {
            throw fail("expected http://host[:port]")
        }
        let scheme = trimmed[..<schemeEnd.lowerBound].lowercased()
        switch scheme {
        case "http": break
        case "https": throw fail("https backends are not supported; use http:// (terminate TLS before the backend)")
        default: throw fail("unsupported scheme '\(scheme)'; only http:// is supported")
        }
        var rest = trimmed[schemeEnd.upperBound...]
        if let slash = rest.firstIndex(where: { $0 == "/" || $0 == "?" || $0 == "#" }) {
            let tail = rest[slash...]
            guard tail == "/" else {
                throw fail("a path, query or fragment is not supported in a backend URL ('\(tail)')")
            }
            rest = rest[..<slash]
        }
        guard !rest.contains("@") else { throw fail("user info is not supported in a backend URL") }
        guard !rest.isEmpty else { throw fail("the host is missing") }

        let host: Substring
        let portText: Substring?
        if rest.first == "[" {
            guard let close = rest.firstIndex(of: "]") else { throw fail("unterminated IPv6 literal") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if after.isEmpty {
                portText = nil
            } else if after.first == ":" {
                portText = after.dropFirst()
            } else {
                throw fail("unexpected '\(after)' after the IPv6 literal")
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
            guard !host.contains(":") else { throw fail("an IPv6 address must be in brackets, e.g. http://[::1]:8080") }
        } else {
            host = rest
            portText = nil
        }
        guard !host.isEmpty else { throw fail("the host is missing") }
        var port = 80
        if let portText {
            guard let value = Int(portText), (1...65_535).contains(value) else {
                throw fail("the port must be a number from 1 to 65535, not '\(portText)'")
            }
            port = value
        }
        return (String(host), port)
    }
}

/// A backend URL that cannot be used, and why.
public struct BackendURLError: Error, Sendable, Hashable, CustomStringConvertible {
    public let url: String
    public let reason: String
    public var description: String { "invalid backend URL '\(url)': \(reason)" }
}

extension String {
    fileprivate func trimmingASCIIWhitespace() -> Substring {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let start = firstIndex(where: { !isSpace($0) }), let end = lastIndex(where: { !isSpace($0) }) else {
            return ""
        }
        return self[start...end]
    }
}

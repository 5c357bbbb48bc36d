/// A plain `http://host[:port][/prefix]` URL: where a server listens, and the
/// path every request to it is put under.
///
/// Only `http` is accepted; user info, a query or a fragment are refused with
/// an ``HTTPBaseURLError`` naming the problem, rather than half-honoured.
/// ``Backend`` parses its URLs with it and refuses a prefix too.
public struct HTTPBaseURL: Sendable, Hashable, CustomStringConvertible {
    /// The URL as given, e.g. `http://127.0.0.1:8080/api`.
    public let url: String
    /// A DNS name or an IP literal (IPv6 without brackets).
    public let host: String
    public let port: Int
    /// The path the requests go under: empty, or starting with `/` and never ending with one.
    public let prefix: String

    /// The value for a `Host` header naming this server (IPv6 in brackets, port
    /// omitted when it is 80).
    public var hostHeader: String {
        let literal = host.contains(":") ? "[\(host)]" : host
        return port == 80 ? literal : "\(literal):\(port)"
    }

    /// `host:port`, with an IPv6 host in brackets.
    public var authority: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    public var description: String { url }

    /// The request target for `path` (which starts with `/`) under the prefix.
    public func target(_ path: String) -> String { prefix + path }

    /// Parses `url`.
    ///
    /// - Throws: ``HTTPBaseURLError`` with a message saying what is wrong and what is accepted.
    public init(_ url: String) throws(HTTPBaseURLError) {
        func fail(_ reason: String) -> HTTPBaseURLError { HTTPBaseURLError(url: url, reason: reason) }
        let trimmed = url.trimmingASCIIWhitespace()
        guard let schemeEnd = trimmed.firstRange(of: "://") else {
            throw fail("expected http://host[:port]")
        }
        let scheme = trimmed[..<schemeEnd.lowerBound].lowercased()
        switch scheme {
        case "http": break
        case "https": throw fail("https is not supported; use http:// (terminate TLS in front)")
        default: throw fail("unsupported scheme '\(scheme)'; only http:// is supported")
        }
        var rest = trimmed[schemeEnd.upperBound...]
        if let mark = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) {
            throw fail("a query or fragment is not supported ('\(rest[mark...])')")
        }
        var path: Substring = ""
        if let slash = rest.firstIndex(of: "/") {
            path = rest[slash...]
            rest = rest[..<slash]
        }
        while path.last == "/" { path = path.dropLast() }
        guard !rest.contains("@") else { throw fail("user info is not supported") }
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
        self.url = url
        self.host = String(host)
        self.port = port
        self.prefix = String(path)
    }
}

/// A URL that cannot be used, and why.
public struct HTTPBaseURLError: Error, Sendable, Hashable, CustomStringConvertible {
    public let url: String
    public let reason: String
    public var description: String { "invalid URL '\(url)': \(reason)" }
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

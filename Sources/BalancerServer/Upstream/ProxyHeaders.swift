import NIOHTTP1

/// The header rewriting of a reverse proxy, both ways (RFC 9110 §7.6).
///
/// Hop-by-hop headers belong to one connection and are never forwarded:
/// `Connection`, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
/// every `Proxy-*` header, and every header the `Connection` header names. The
/// body framing is decided again for the next hop: upstream, a request carries
/// either `Content-Length` or `Transfer-Encoding: chunked`, never both.
enum ProxyHeaders {
    /// The token added to `Via` in both directions.
    static let viaToken = "swift-balancer"

    /// How a request body is framed on the upstream connection.
    enum RequestFraming: Sendable, Hashable {
        /// No body.
        case none
        /// Exactly this many bytes, sent with `Content-Length`.
        case contentLength(Int)
        /// An unknown length, sent with `Transfer-Encoding: chunked`.
        case chunked
    }

    /// The request head to send to `backend` for the client's `head`, and how its body is framed.
    ///
    /// The client's `Host` is kept (the backend sees the name the client used);
    /// `X-Forwarded-For` gets the client's address appended, `X-Forwarded-Proto`
    /// and `X-Forwarded-Host` are set (replacing what the client sent: this proxy
    /// is the edge), and `Via` gets `<version> swift-balancer` appended.
    /// `X-Request-Id` is the server's (``ForwardedFor/requestID``) when it has
    /// one; it and every other end-to-end header pass through otherwise.
    static func upstreamRequest(
        _ head: HTTPRequestHead,
        forwarding: ForwardedFor,
        backend: Backend
    ) -> (head: HTTPRequestHead, framing: RequestFraming) {
        let client = head.headers
        let connectionTokens = client[canonicalForm: "connection"]
        let hasTransferEncoding = client.contains(name: "transfer-encoding")
        let framing: RequestFraming
        let declaredLength = client.first(name: "content-length").flatMap { Int($0) }
        if hasTransferEncoding {
            // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length.
            framing = .chunked
        } else if let length = declaredLength, length > 0 {
            framing = .contentLength(length)
        } else {
            framing = .none
        }
        // An empty body keeps an explicit length where one is expected, so the
        // encoder does not frame an empty POST as chunked.
        let emptyBodyNeedsLength =
            framing == .none
            && (declaredLength == 0 || head.method == .POST || head.method == .PUT || head.method == .PATCH)

        var headers = HTTPHeaders()
        headers.reserveCapacity(client.count + 4)
        var host: String?
        var forwardedFor: String?
        var via: String?
        for (name, value) in client {
            if isHopByHop(name) || isNamed(name, in: connectionTokens) { continue }
            if name.equalsIgnoringASCIICase("content-length") { continue }
            if name.equalsIgnoringASCIICase("host") {
                if host == nil { host = value }
                continue
            }
            if name.equalsIgnoringASCIICase("x-forwarded-for") {
                forwardedFor = listing(forwardedFor, value)
                continue
            }
            if name.equalsIgnoringASCIICase("x-forwarded-proto") || name.equalsIgnoringASCIICase("x-forwarded-host") {
                continue
            }
            if name.equalsIgnoringASCIICase("via") {
                via = listing(via, value)
                continue
            }
            if forwarding.requestID != nil && name.equalsIgnoringASCIICase(RequestID.headerName) { continue }
            headers.add(name: name, value: value)
        }
        headers.add(name: "Host", value: host ?? backend.hostHeader)
        if let requestID = forwarding.requestID { headers.add(name: "X-Request-Id", value: requestID) }
        switch framing {
        case .none: if emptyBodyNeedsLength { headers.add(name: "Content-Length", value: "0") }
        case .contentLength(let length): headers.add(name: "Content-Length", value: String(length))
        case .chunked: headers.add(name: "Transfer-Encoding", value: "chunked")
        }
        if let address = forwarding.clientAddress { forwardedFor = listing(forwardedFor, address) }
        if let forwardedFor { headers.add(name: "X-Forwarded-For", value: forwardedFor) }
        headers.add(name: "X-Forwarded-Proto", value: forwarding.proto)
        if let forwardedHost = forwarding.host ?? host { headers.add(name: "X-Forwarded-Host", value: forwardedHost) }
        headers.add(name: "Via", value: listing(via, viaEntry(head.version)))

        return (HTTPRequestHead(version: .http1_1, method: head.method, uri: head.uri, headers: headers), framing)
    }

    /// The response head to give the client for the backend's `head`: hop-by-hop
    /// headers removed, `Via` appended, version 1.1 (the server frames the body
    /// for its own connection). `Content-Length` is kept unless the backend also
    /// sent `Transfer-Encoding`, which overrides it.
    static func clientResponse(_ head: HTTPResponseHead) -> HTTPResponseHead {
        let backend = head.headers
        let connectionTokens = backend[canonicalForm: "connection"]
        let chunked = backend.contains(name: "transfer-encoding")
        var headers = HTTPHeaders()
        headers.reserveCapacity(backend.count + 1)
        var via: String?
        for (name, value) in backend {
            if isHopByHop(name) || isNamed(name, in: connectionTokens) { continue }
            if chunked && name.equalsIgnoringASCIICase("content-length") { continue }
            if name.equalsIgnoringASCIICase("via") {
                via = listing(via, value)
                continue
            }
            headers.add(name: name, value: value)
        }
        headers.add(name: "Via", value: listing(via, viaEntry(head.version)))
        return HTTPResponseHead(version: .http1_1, status: head.status, headers: headers)
    }

    /// The `Via` entry this proxy adds to a message of `version` (RFC 9110 §7.6.3);
    /// those of HTTP/1.1 and 1.0 are made once, not per request.
    static func viaEntry(_ version: HTTPVersion) -> String {
        switch (version.major, version.minor) {
        case (1, 1): via11
        case (1, 0): via10
        default: "\(version.major).\(version.minor) \(viaToken)"
        }
    }
    private static let via11 = "1.1 \(viaToken)"
    private static let via10 = "1.0 \(viaToken)"

    /// A comma-separated header list (`Via`, `X-Forwarded-For`) with `item` appended.
    private static func listing(_ list: String?, _ item: String) -> String {
        guard let list else { return item }
        return "\(list), \(item)"
    }

    /// Whether `name` is one of the fixed hop-by-hop headers (not counting those
    /// the `Connection` header names).
    static func isHopByHop(_ name: String) -> Bool {
        let matched: Bool
        switch name.utf8.count {
        case 2: matched = name.equalsIgnoringASCIICase("te")
        case 7: matched = name.equalsIgnoringASCIICase("trailer") || name.equalsIgnoringASCIICase("upgrade")
        case 10: matched = name.equalsIgnoringASCIICase("connection") || name.equalsIgnoringASCIICase("keep-alive")
        case 17: matched = name.equalsIgnoringASCIICase("transfer-encoding")
        default: matched = false
        }
        return matched || name.hasPrefixIgnoringASCIICase("proxy-")
    }

    private static func isNamed(_ name: String, in tokens: [Substring]) -> Bool {
        for token in tokens where name.equalsIgnoringASCIICase(token) { return true }
        return false
    }
}

extension StringProtocol {
    /// ASCII case-insensitive equality, without allocating (header names are ASCII).
    fileprivate func equalsIgnoringASCIICase(_ other: some StringProtocol) -> Bool {
        guard utf8.count == other.utf8.count else { return false }
        return zip(utf8, other.utf8).allSatisfy { $0.asciiLowercased == $1.asciiLowercased }
    }

    fileprivate func hasPrefixIgnoringASCIICase(_ prefix: some StringProtocol) -> Bool {
        guard utf8.count >= prefix.utf8.count else { return false }
        return zip(utf8, prefix.utf8).allSatisfy { $0.asciiLowercased == $1.asciiLowercased }
    }
}

extension UInt8 {
    fileprivate var asciiLowercased: UInt8 { (65...90).contains(self) ? self | 0x20 : self }
}

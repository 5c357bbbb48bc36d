import AsyncAlgorithms
import NIOCore
import NIOHTTP1
import Synchronization

extension HTTPServer {
    /// The paths the server answers itself; with an upstream pool, every other
    /// path goes to the backends.
    static let ownPaths: Set<Substring> = ["/jobs", "/stats", "/dashboard", "/healthz", "/readyz", "/metrics"]

    /// Whether a request for `uri` goes to the upstream pool.
    func isProxied(_ uri: String) -> Bool {
        guard upstream != nil else { return false }
        let path = uri.utf8.firstIndex(of: UInt8(ascii: "?")).map { uri[..<$0] } ?? uri[...]
        return !Self.ownPaths.contains(path) && !path.hasPrefix("/admin/")
    }

    /// Proxies one request: streams its body to the worker forwarding it while
    /// the response streams back. Returns whether the connection may carry
    /// another request.
    func proxy(
        _ head: HTTPRequestHead,
        requestID: String,
        parts: inout NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator,
        connection: Connection,
        outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    ) async throws -> Bool {
        guard let upstream else { return false }
        let keepAlive = head.isKeepAlive && !state.isDraining
        let acceptsTrailers = head.headers[canonicalForm: "te"].contains { $0.lowercased() == "trailers" }
        let started = observer.isActive ? ContinuousClock.now : nil
        let writer = ClientResponseWriter(
            outbound: outbound, version: head.version, keepAlive: keepAlive, acceptsTrailers: acceptsTrailers,
            requestID: requestID)
        let forwarding = ForwardedFor(
            client: connection.channel.remoteAddress,
            host: head.headers.first(name: "host"),
            requestID: requestID
        )
        let hasBody =
            head.headers.first(name: "transfer-encoding") != nil
            || (head.headers.first(name: "content-length").flatMap { Int($0) } ?? 0) > 0
        if head.headers.first(name: "expect")?.lowercased() == "100-continue" {
            try await outbound.write(.head(HTTPResponseHead(version: head.version, status: .continue)))
        }

        let outcome: UpstreamPool.Outcome
        var bodyEnded = false
        if hasBody {
            // The body goes to the worker through a channel whose `send` waits
            // for the worker to take each part: backpressure end to end.
            let body = AsyncThrowingChannel<ByteBuffer, any Error>()
            outcome = try await withThrowingTaskGroup(of: UpstreamPool.Outcome.self) { group in
                group.addTask {
                    let outcome = await upstream.proxy(
                        head, body: body, replayable: false, forwarding: forwarding, to: writer)
                    body.finish()  // a send still waiting (the forward ended early) returns
                    return outcome
                }
                do {
                    pumping: while let part = try await parts.next() {
                        switch part {
                        case .body(let chunk): await body.send(chunk)
                        case .end:
                            bodyEnded = true
                            body.finish()
                            break pumping
                        case .head: break pumping
                        }
                    }
                } catch {
                    body.fail(error)
                }
                return try await group.next()!
            }
        } else {
            while let part = try await parts.next() {
                if case .end = part {
                    bodyEnded = true
                    break
                }
            }
            outcome = await upstream.proxy(
                head, body: EmptyBody(), replayable: true, forwarding: forwarding, to: writer)
        }

        switch outcome {
        case .forwarded(let served, let result):
            if let started {
                observer.observe(
                    RequestRecord(
                        method: head.method, uri: head.uri, requestID: requestID, status: result.status, pool: .upstream,
                        served: served, total: .now - started, bytesIn: result.requestBodyBytes,
                        bytesOut: result.responseBodyBytes))
            }
            return keepAlive && bodyEnded
        case .failed(let error):
            let response = Response(error, allocator: connection.channel.allocator)
            try await write(response, for: head, requestID: requestID, keepAlive: false, to: outbound)
            observe(head, requestID: requestID, error: response, pool: .upstream)
            return false
        case .abort:
            // The client went away, or the backend failed after the head went
            // out: the status is the one the client saw, if any.
            let status = writer.writtenStatus ?? .custom(code: 499, reasonPhrase: "Client Closed Request")
            observe(head, requestID: requestID, error: Response(status: status, body: ByteBuffer()), pool: .upstream)
            return false
        }
    }
}

/// The client's side of a proxied exchange, over the connection's outbound writer.
///
/// Adds `Connection: close` to the head when the connection will not be kept
/// (the client asked, or the server is draining); NIO's encoder frames a body
/// with no `Content-Length` as chunked. A backend's trailers are passed on only
/// to a client that sent `TE: trailers` (some clients, URLSession on Linux
/// among them, fail on trailers they did not ask for). Each write returns when
/// NIO took it (the writer's own backpressure), so a slow client slows the
/// backend's reads.
final class ClientResponseWriter: ClientResponseWriting {
    let outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    let version: HTTPVersion
    let keepAlive: Bool
    let acceptsTrailers: Bool
    /// Sent back as `X-Request-Id`, whatever the backend said.
    let requestID: String
    /// The status code of the head written; 0 before.
    private let wroteStatus = Atomic<Int>(0)

    init(
        outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        version: HTTPVersion,
        keepAlive: Bool,
        acceptsTrailers: Bool,
        requestID: String
    ) {
        self.outbound = outbound
        self.version = version
        self.keepAlive = keepAlive
        self.acceptsTrailers = acceptsTrailers
        self.requestID = requestID
    }

    var headWritten: Bool { wroteStatus.load(ordering: .acquiring) != 0 }

    /// The status of the head written, if one was.
    var writtenStatus: HTTPResponseStatus? {
        let code = wroteStatus.load(ordering: .acquiring)
        return code == 0 ? nil : HTTPResponseStatus(statusCode: code)
    }

    func writeHead(_ head: HTTPResponseHead) async throws {
        var head = head
        head.version = version
        if !keepAlive {
            head.headers.replaceOrAdd(name: "connection", value: "close")
        } else if version.major == 1 && version.minor == 0 {
            head.headers.replaceOrAdd(name: "connection", value: "keep-alive")
        }
        head.headers.replaceOrAdd(name: RequestID.headerName, value: requestID)
        wroteStatus.store(Int(head.status.code), ordering: .releasing)
        try await outbound.write(.head(head))
    }

    func writeBody(_ buffer: ByteBuffer) async throws {
        try await outbound.write(.body(.byteBuffer(buffer)))
    }

    func end(trailers: HTTPHeaders?) async throws {
        try await outbound.write(.end(acceptsTrailers ? trailers : nil))
    }
}

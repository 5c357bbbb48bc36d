import AsyncAlgorithms
import NIOCore
import NIOHTTP1
import Synchronization

extension HTTPServer {
    /// The paths the server answers itself; with an upstream pool, every other
    /// path goes to the backends.
    static let ownPaths: Set<Substring> = ["/jobs", "/stats", "/healthz", "/readyz", "/metrics"]

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
        parts: inout NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator,
        connection: Connection,
        outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    ) async throws -> Bool {
        guard let upstream else { return false }
        let keepAlive = head.isKeepAlive && !state.isDraining
        let acceptsTrailers = head.headers[canonicalForm: "te"].contains { $0.lowercased() == "trailers" }
        let writer = ClientResponseWriter(
            outbound: outbound, version: head.version, keepAlive: keepAlive, acceptsTrailers: acceptsTrailers)
        let forwarding = ForwardedFor(
            client: connection.channel.remoteAddress,
            host: head.headers.first(name: "host")
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
        case .forwarded:
            return keepAlive && bodyEnded
        case .failed(let error):
            try await write(Response(error, allocator: connection.channel.allocator), for: head, keepAlive: false, to: outbound)
            return false
        case .abort:
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
    private let wroteHead = Atomic<Bool>(false)

    init(
        outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        version: HTTPVersion,
        keepAlive: Bool,
        acceptsTrailers: Bool
    ) {
        self.outbound = outbound
        self.version = version
        self.keepAlive = keepAlive
        self.acceptsTrailers = acceptsTrailers
    }

    var headWritten: Bool { wroteHead.load(ordering: .acquiring) }

    func writeHead(_ head: HTTPResponseHead) async throws {
        var head = head
        head.version = version
        if !keepAlive {
            head.headers.replaceOrAdd(name: "connection", value: "close")
        } else if version.major == 1 && version.minor == 0 {
            head.headers.replaceOrAdd(name: "connection", value: "keep-alive")
        }
        wroteHead.store(true, ordering: .releasing)
        try await outbound.write(.head(head))
    }

    func writeBody(_ buffer: ByteBuffer) async throws {
        try await outbound.write(.body(.byteBuffer(buffer)))
    }

    func end(trailers: HTTPHeaders?) async throws {
        try await outbound.write(.end(acceptsTrailers ? trailers : nil))
    }
}

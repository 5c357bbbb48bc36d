import AsyncAlgorithms
import NIOCore
import NIOHTTP1
import Synchronization

extension HTTPServer {
    /// Proxies one request: streams its body to the worker forwarding it while
    /// the response streams back. Returns whether the connection may carry
    /// another request.
    func proxy(
        _ head: HTTPRequestHead,
        to upstream: UpstreamPool,
        requestID: String,
        parts: inout NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator,
        connection: Connection,
        outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    ) async throws -> Bool {
        let keepAlive = head.isKeepAlive && !state.isDraining
        let acceptsTrailers = head.headers[canonicalForm: "te"].contains { $0.lowercased() == "trailers" }
        let started = observer.isActive ? ContinuousClock.now : nil
        let writer = ClientResponseWriter(
            channel: connection.channel, version: head.version, keepAlive: keepAlive, acceptsTrailers: acceptsTrailers,
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
                        method: head.method, uri: head.uri, requestID: requestID, status: result.status, pool: upstream.poolName,
                        served: served, total: .now - started, bytesIn: result.requestBodyBytes,
                        bytesOut: result.responseBodyBytes))
            }
            try await writer.awaitBackedUpEnd()
            return keepAlive && bodyEnded
        case .failed(let error):
            let response = Response(error, allocator: connection.channel.allocator)
            try await write(response, for: head, requestID: requestID, keepAlive: false, to: outbound)
            observe(head, requestID: requestID, error: response, pool: upstream.poolName)
            return false
        case .abort:
            // The client went away, or the backend failed after the head went
            // out: the status is the one the client saw, if any.
            let status = writer.writtenStatus ?? .custom(code: 499, reasonPhrase: "Client Closed Request")
            observe(head, requestID: requestID, error: Response(status: status, body: ByteBuffer()), pool: upstream.poolName)
            return false
        }
    }
}

/// The client's side of a proxied exchange, written straight to the client's channel.
///
/// Adds `Connection: close` to the head when the connection will not be kept
/// (the client asked, or the server is draining); NIO's encoder frames a body
/// with no `Content-Length` as chunked. A backend's trailers are passed on only
/// to a client that sent `TE: trailers` (some clients, URLSession on Linux
/// among them, fail on trailers they did not ask for).
///
/// The parts are held back and go out together, with one flush, whenever the
/// backend has nothing more ready (``flush()``, at the end of each read batch of
/// the upstream channel) or the response ends: a response that arrives in one
/// read is one write and one flush (one hop to the client's event loop and one
/// system call, where writing each part costs one of each), and a response the
/// backend streams reaches the client as it comes. A flush, and a write of
/// ``flushThreshold`` bytes held within one batch, returns only when the
/// client's socket took it, so a slow client slows the backend's reads and a
/// connection holds at most about ``flushThreshold`` bytes of a large response
/// (the upload side waits the same way).
///
/// Until the head goes out, ``headWritten`` is false: a backend that fails
/// within the batch that brought its head is answered with an error response
/// in its place, and the held parts are dropped.
///
/// Writing to the channel beside the connection's `NIOAsyncChannelOutboundWriter`
/// keeps the order: both go through the channel's event loop in the order they
/// are issued, and the connection task writes nothing while a proxied exchange
/// runs.
final class ClientResponseWriter: ClientResponseWriting {
    /// Bytes of body held within one read batch before they are written and awaited.
    static let flushThreshold = 64 * 1024

    /// Parts not yet written.
    private struct Held {
        var parts: [HTTPServerResponsePart] = []
        /// Body bytes among `parts`.
        var bytes = 0
        /// The status code of the head among `parts`; 0 when it is not there.
        var headStatus = 0
    }

    let channel: any Channel
    let version: HTTPVersion
    let keepAlive: Bool
    let acceptsTrailers: Bool
    /// Sent back as `X-Request-Id`, whatever the backend said.
    let requestID: String
    /// The status code of the head sent to the client; 0 before.
    private let sentStatus = Atomic<Int>(0)
    /// Only the forwarding task writes; the locks make the class Sendable at
    /// no cost (never contended).
    private let held = Mutex(Held())
    /// The write of the end on a kept connection that was over its high
    /// watermark, for ``awaitBackedUpEnd()``.
    private let backedUpEnd = Mutex<EventLoopFuture<Void>?>(nil)

    init(channel: any Channel, version: HTTPVersion, keepAlive: Bool, acceptsTrailers: Bool, requestID: String) {
        self.channel = channel
        self.version = version
        self.keepAlive = keepAlive
        self.acceptsTrailers = acceptsTrailers
        self.requestID = requestID
    }

    var headWritten: Bool { sentStatus.load(ordering: .acquiring) != 0 }

    /// The status of the head sent to the client, if one was.
    var writtenStatus: HTTPResponseStatus? {
        let code = sentStatus.load(ordering: .acquiring)
        return code == 0 ? nil : HTTPResponseStatus(statusCode: code)
    }

    /// Holds the head; anything still held from an earlier try that failed is dropped.
    func writeHead(_ head: HTTPResponseHead) async throws {
        var head = head
        head.version = version
        if !keepAlive {
            head.headers.replaceOrAdd(name: "connection", value: "close")
        } else if version.major == 1 && version.minor == 0 {
            head.headers.replaceOrAdd(name: "connection", value: "keep-alive")
        }
        head.headers.replaceOrAdd(name: RequestID.headerName, value: requestID)
        held.withLock { held in
            held = Held(headStatus: Int(head.status.code))
            held.parts.reserveCapacity(3)
            held.parts.append(.head(head))
        }
    }

    func writeBody(_ buffer: ByteBuffer) async throws {
        let full: [HTTPServerResponsePart]? = held.withLock { held in
            held.parts.append(.body(.byteBuffer(buffer)))
            held.bytes += buffer.readableBytes
            guard held.bytes >= Self.flushThreshold else { return nil }
            return take(&held)
        }
        if let full { try await sendAndWait(full) }
    }

    func flush() async throws {
        let parts = held.withLock { take(&$0) }
        if !parts.isEmpty { try await sendAndWait(parts) }
    }

    /// Writes what is held and the end. Before a close it waits, so the close
    /// cannot cut the response. On a kept connection it returns without waiting
    /// for the socket (nothing more comes from the backend for this response, and
    /// its worker is free at once); if the channel is over its high watermark
    /// (the client does not read), ``awaitBackedUpEnd()`` waits for this write.
    func end(trailers: HTTPHeaders?) async throws {
        var parts = held.withLock { take(&$0) }
        parts.append(.end(acceptsTrailers ? trailers : nil))
        guard keepAlive else { return try await sendAndWait(parts) }
        guard !channel.isWritable else { return send(parts, promise: nil) }
        let written = channel.eventLoop.makePromise(of: Void.self)
        send(parts, promise: written)
        backedUpEnd.withLock { $0 = written.futureResult }
    }

    /// Waits for the write of the end if the client's channel was backed up when
    /// it was issued: the connection takes no next request before that, so a
    /// client that pipelines requests and never reads cannot make the server
    /// buffer responses without bound.
    func awaitBackedUpEnd() async throws {
        try await backedUpEnd.withLock { $0 }?.get()
    }

    /// Takes what is held to write it now: the head among it counts as sent from here on.
    private func take(_ held: inout Held) -> [HTTPServerResponsePart] {
        if held.headStatus != 0 { sentStatus.store(held.headStatus, ordering: .releasing) }
        defer { held = Held() }
        return held.parts
    }

    private func sendAndWait(_ parts: [HTTPServerResponsePart]) async throws {
        let written = channel.eventLoop.makePromise(of: Void.self)
        send(parts, promise: written)
        try await written.futureResult.get()
    }

    /// Writes `parts` and flushes once, on the channel's event loop.
    private func send(_ parts: [HTTPServerResponsePart], promise: EventLoopPromise<Void>?) {
        let channel = self.channel
        if channel.eventLoop.inEventLoop {
            Self.write(parts, to: channel, promise: promise)
        } else {
            channel.eventLoop.execute { Self.write(parts, to: channel, promise: promise) }
        }
    }

    private static func write(_ parts: [HTTPServerResponsePart], to channel: any Channel, promise: EventLoopPromise<Void>?) {
        for part in parts.dropLast() { channel.write(part, promise: nil) }
        channel.writeAndFlush(parts[parts.count - 1], promise: promise)
    }
}

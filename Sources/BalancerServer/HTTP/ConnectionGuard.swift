import NIOCore
import NIOHTTP1

/// Per-connection limits and drain, on the channel's event loop: the idle
/// keep-alive timeout, the header and body read timeouts (408), the send
/// timeout (a client that takes none of its response: closed), parse errors
/// (400, and 431 for an oversized head), and quiescing on shutdown.
///
/// It sits between the HTTP codec and the `NIOAsyncChannel`, sees request
/// parts in and response parts out, and keeps count of requests whose answer
/// is not yet written. A ``ConnectionGuard/ByteWatcher`` in front of the
/// decoder tells it when the first bytes of a new request arrive, and what
/// each read held once the decoder has taken it: a read can end a request
/// and bring the start of the next one's head, which the decoder keeps
/// without a word (``holdsMore(_:)``); that head is timed like any other.
///
/// Deadlines are checked by one repeating timer per connection (``tick``), not
/// one timer per request, so keep-alive traffic pays a clock read per request
/// and nothing else.
final class ConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    struct Limits: Sendable {
        var idleTimeout: TimeAmount
        var headerTimeout: TimeAmount
        var bodyTimeout: TimeAmount
        var sendTimeout: TimeAmount
        var maxHeaderBytes: Int

        /// How often deadlines are checked: a fifth of the shortest timeout,
        /// from 5 ms to 1 s.
        var tick: TimeAmount {
            let shortest = min(idleTimeout, headerTimeout, bodyTimeout, sendTimeout)
            return max(.milliseconds(5), min(.seconds(1), .nanoseconds(shortest.nanoseconds / 5)))
        }
    }

    private let limits: Limits
    private let stats: ConnectionStats
    /// Requests whose head has arrived and whose response has not ended.
    private var inFlight = 0
    /// The latest request's head has arrived but not its end.
    private var readingBody = false
    /// Bytes of a request whose head has not been parsed yet have arrived.
    private var readingHead = false
    /// What the current read brought, for ``readDecoded(_:)``.
    private var read = ReadParts()
    /// The latest request's body is chunked (it ends with a blank line).
    private var chunked = false
    private var idleSince = NIODeadline.now()
    private var headStartedAt = NIODeadline.now()
    private var bodyStartedAt = NIODeadline.now()
    private var quiescing = false
    /// A `Connection: close` answer is being written: close once it is out.
    private var closeAfterResponse = false
    private var closing = false
    /// Bytes the channel held for the client's socket at the last tick.
    private var unsent = 0
    /// The last tick at which `unsent` was zero or had changed.
    private var sendMovedAt = NIODeadline.now()
    private var timer: RepeatedTask?

    init(limits: Limits, stats: ConnectionStats) {
        self.limits = limits
        self.stats = stats
    }

    // MARK: Lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        idleSince = .now()
        let tick = limits.tick
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in
            let (handler, context) = loopBound.value
            handler.check(context: context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        context.fireChannelInactive()
    }

    // MARK: Inbound

    /// Called by the ``ByteWatcher`` before bytes reach the decoder.
    func bytesArrived() {
        read = ReadParts()
        if !readingBody && !readingHead {
            readingHead = true
            headStartedAt = .now()
        }
    }

    /// Called by the ``ByteWatcher`` once the decoder has taken `bytes`, the
    /// whole read: if a request ended in it and more bytes followed, they are
    /// the start of a head (the decoder holds them), under the header timeout.
    func readDecoded(_ bytes: ByteBuffer) {
        guard read.ended, !readingBody, !readingHead, holdsMore(bytes) else { return }
        readingHead = true
        headStartedAt = .now()
    }

    /// Whether the read `bytes`, in which a request ended, holds bytes after it.
    ///
    /// The decoder does not tell, but the request's framing does: without a
    /// body, or with a chunked one, a request ends with a blank line; with a
    /// `Content-Length` body it ends with the body bytes the decoder passed on,
    /// which follow its head's blank line if the head came in this read, or
    /// start the read if it came before. What may follow is a head that has not
    /// ended, so it holds no blank line. (A body that ends with a blank line
    /// just where the head's would be hides a following partial head: that
    /// connection waits out the idle timeout instead.)
    private func holdsMore(_ bytes: ByteBuffer) -> Bool {
        let requestEnd = bytes.readableBytes - (chunked ? 0 : read.bodyBytes)
        if !chunked && !read.headArrived { return requestEnd > 0 }
        // The blank line may have begun in the previous read: compare what is here.
        let length = min(Self.blankLine.count, requestEnd)
        guard length > 0 else { return true }
        let start = bytes.readerIndex + requestEnd - length
        for offset in 0..<length
        where bytes.getInteger(at: start + offset, as: UInt8.self) != Self.blankLine[Self.blankLine.count - length + offset] {
            return true
        }
        return false
    }

    private static let blankLine: [UInt8] = Array("\r\n\r\n".utf8)

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            inFlight += 1
            readingHead = false
            readingBody = true
            bodyStartedAt = .now()
            chunked = head.headers.contains(name: "transfer-encoding")
            read = ReadParts(headArrived: true)
        case .body(let chunk):
            read.bodyBytes += chunk.readableBytes
        case .end:
            readingBody = false
            read.ended = true
        }
        context.fireChannelRead(data)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parserError = error as? HTTPParserError else {
            context.fireErrorCaught(error)
            return
        }
        let answer: APIError =
            parserError == .headerOverflow
            ? .headersTooLarge(limit: limits.maxHeaderBytes)
            : .badRequest("the request is not valid HTTP/1.1: \(parserError)")
        respondAndClose(context: context, with: answer)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent {
            quiescing = true
            if inFlight == 0 && !readingHead && !readingBody {
                close(context: context)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    // MARK: Outbound

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(var head) where quiescing && head.status.code >= 200:
            // Draining: this is the connection's last answer.
            head.headers.replaceOrAdd(name: "connection", value: "close")
            closeAfterResponse = true
            context.write(wrapOutboundOut(.head(head)), promise: promise)
        case .end:
            inFlight -= 1
            if inFlight <= 0 {
                inFlight = 0
                idleSince = .now()
            }
            if closeAfterResponse {
                let written = context.eventLoop.makePromise(of: Void.self)
                if let promise { written.futureResult.cascade(to: promise) }
                let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                written.futureResult.whenComplete { _ in
                    let (handler, context) = loopBound.value
                    handler.close(context: context)
                }
                context.writeAndFlush(data, promise: written)
            } else {
                context.write(data, promise: promise)
            }
        default:
            context.write(data, promise: promise)
        }
    }

    // MARK: Deadlines

    /// The repeating timer: close a connection whose client takes nothing or
    /// an idle one, or answer 408 to a slow one.
    private func check(context: ChannelHandlerContext) {
        guard !closing else { return }
        let now = NIODeadline.now()
        if sendStalled(context: context, now: now) {
            // Whatever is answering sees the channel close: a proxied
            // response ends its forward as for a client that went away.
            stats.countSendTimeout()
            close(context: context)
        } else if readingBody {
            if inFlight <= 1, now - bodyStartedAt > limits.bodyTimeout {
                respondAndClose(context: context, with: .bodyTimeout)
            }
        } else if inFlight > 0 {
            return  // a job is running: its own timeout applies
        } else if readingHead {
            if now - headStartedAt > limits.headerTimeout {
                respondAndClose(context: context, with: .headerTimeout)
            }
        } else if now - idleSince > limits.idleTimeout {
            close(context: context)
        }
    }

    /// Whether the client has taken none of the bytes waiting for it for the
    /// send timeout: the channel's count of bytes not yet written to the socket
    /// has stayed the same, above zero, since then. Writers wait for the socket
    /// (backpressure), so a client that reads nothing leaves the count still.
    private func sendStalled(context: ChannelHandlerContext, now: NIODeadline) -> Bool {
        let waiting = (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
        if waiting == 0 || waiting != unsent {
            unsent = waiting
            sendMovedAt = now
            return false
        }
        return now - sendMovedAt > limits.sendTimeout
    }

    /// Writes an error answer straight to the codec and closes, unless an
    /// earlier request's answer is still being produced (then just closes).
    private func respondAndClose(context: ChannelHandlerContext, with error: APIError) {
        guard !closing else { return }
        let answeringEarlier = readingBody ? inFlight > 1 : inFlight > 0
        if answeringEarlier {
            close(context: context)
            return
        }
        closing = true
        var head = HTTPResponseHead(version: .http1_1, status: error.status)
        let body = error.body(allocator: context.channel.allocator)
        head.headers.add(name: "content-type", value: "application/json")
        head.headers.add(name: "content-length", value: String(body.readableBytes))
        head.headers.add(name: "connection", value: "close")
        // No request head was taken from the parser for this answer: a new id.
        head.headers.add(name: RequestID.headerName, value: RequestID.generate())
        for (name, value) in error.headers { head.headers.add(name: name, value: value) }
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            lingeringClose(channel)
        }
    }

    private func close(context: ChannelHandlerContext) {
        guard !closing else { return }
        closing = true
        context.close(promise: nil)
    }
}

extension ConnectionGuard {
    /// What the request parts decoded from one read said about the latest request.
    struct ReadParts {
        /// Its head came in this read.
        var headArrived = false
        /// Its body bytes in this read.
        var bodyBytes = 0
        /// It ended in this read.
        var ended = false
    }

    /// The first handler on a connection: tells the guard that bytes arrived,
    /// so it can time the reading of a request's head from its first byte,
    /// and shows it each read once the decoder has taken it.
    final class ByteWatcher: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer

        private let connectionGuard: ConnectionGuard

        init(_ connectionGuard: ConnectionGuard) {
            self.connectionGuard = connectionGuard
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = unwrapInboundIn(data)
            connectionGuard.bytesArrived()
            context.fireChannelRead(data)
            connectionGuard.readDecoded(bytes)
        }
    }
}

/// Closes a connection after an early error answer (408, 413, 431, 400)
/// without losing that answer: a close with unread input makes the kernel send
/// a reset, which can destroy the answer before the client reads it. So the
/// sending side is shut first, input is left to drain, and the connection is
/// closed for good a second later (or when the client closes first).
func lingeringClose(_ channel: any Channel) {
    channel.close(mode: .output, promise: nil)
    channel.eventLoop.scheduleTask(in: .seconds(1)) {
        channel.close(promise: nil)
    }
}

import NIOCore
import NIOHTTP1

/// The timeout of an upstream exchange that fired; the channel is closed after
/// it is passed up the pipeline, so the response stream fails with it.
enum UpstreamTimeout: Error, Sendable, Hashable {
    /// No response head within the response-header timeout after the request ended.
    case responseHead
    /// The backend was silent for the idle timeout while we waited for response
    /// body bytes, or did not drain our request body for that long.
    case idle
}

/// Enforces the response-header and idle timeouts of one upstream connection.
///
/// It sits between the HTTP codec and the `NIOAsyncChannel` handlers and runs on
/// the channel's event loop only, so its state needs no lock. It follows the
/// exchange from the parts passing through:
/// - request `.end` written: the response-head deadline starts (fixed, not reset
///   by partial reads);
/// - response head read: that deadline is cancelled, the body phase starts;
/// - body phase: the idle clock runs only while a `read()` is outstanding (we
///   asked the backend for bytes and none came). When the client is slow, the
///   async channel withholds `read()` and the clock stops, so a slow client is
///   never blamed on the backend;
/// - request body phase: the idle clock runs only while a body write has not
///   reached the socket, and restarts whenever one does (the backend is not
///   draining what we send);
/// - response `.end` read: nothing runs (an idle keep-alive connection has no timer).
///
/// It also guards the idle connection: a response part that arrives when no
/// request is in flight (a backend announcing its idle timeout with an
/// unsolicited `408` before closing, say) is dropped and the connection closed,
/// so it can never be taken for the answer to the next request.
final class UpstreamTimeoutHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias InboundOut = HTTPClientResponsePart
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = HTTPClientRequestPart

    private let responseHeaderTimeout: TimeAmount
    private let idleTimeout: TimeAmount

    /// Between request `.head` and response `.end`.
    private var inExchange = false
    /// Between request `.head` and request `.end`.
    private var sendingRequest = false
    /// Between request `.end` and the response head.
    private var awaitingHead = false
    /// Between the response head and the response `.end`.
    private var receivingBody = false
    /// When the outstanding `read()` in the body phase was issued; `nil` if none is outstanding.
    private var readPendingSince: NIODeadline?
    private var headTimer: Scheduled<Void>?
    private var idleTimer: Scheduled<Void>?
    private var stallTimer: Scheduled<Void>?
    /// Request body writes handed down and not yet on the socket.
    private var pendingBodyWrites = 0

    init(responseHeaderTimeout: TimeAmount, idleTimeout: TimeAmount) {
        self.responseHeaderTimeout = responseHeaderTimeout
        self.idleTimeout = idleTimeout
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head:
            inExchange = true
            sendingRequest = true
            awaitingHead = false
            receivingBody = false
        case .body:
            if sendingRequest {
                let promise = promise ?? context.eventLoop.makePromise()
                writeStarted(context: context)
                promise.futureResult.assumeIsolated().whenComplete { _ in self.writeCompleted(context: context) }
                context.write(data, promise: promise)
                return
            }
        case .end:
            sendingRequest = false
            pendingBodyWrites = 0
            stallTimer?.cancel()
            stallTimer = nil
            if !receivingBody {
                awaitingHead = true
                armHeadTimer(context: context)
            }
        }
        context.write(data, promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard inExchange else {
            context.close(promise: nil)
            return
        }
        switch unwrapInboundIn(data) {
        case .head:
            // Interim (1xx) responses are dropped by the decoder: this is the final head.
            awaitingHead = false
            headTimer?.cancel()
            headTimer = nil
            receivingBody = true
            readPendingSince = nil
        case .body:
            readPendingSince = nil
        case .end:
            inExchange = false
            receivingBody = false
            readPendingSince = nil
            idleTimer?.cancel()
            idleTimer = nil
        }
        context.fireChannelRead(data)
    }

    func read(context: ChannelHandlerContext) {
        if receivingBody {
            if readPendingSince == nil { readPendingSince = .now() }
            if idleTimer == nil { armIdleTimer(context: context, at: .now() + idleTimeout) }
        }
        context.read()
    }

    /// A request body write went out: the stall clock runs while any is pending.
    private func writeStarted(context: ChannelHandlerContext) {
        pendingBodyWrites += 1
        if stallTimer == nil { armStallTimer(context: context) }
    }

    /// A request body write reached the socket (or failed): progress, so the
    /// stall clock starts again, or stops when nothing is pending.
    private func writeCompleted(context: ChannelHandlerContext) {
        guard pendingBodyWrites > 0 else { return }
        pendingBodyWrites -= 1
        stallTimer?.cancel()
        stallTimer = nil
        if pendingBodyWrites > 0 && sendingRequest { armStallTimer(context: context) }
    }

    private func armStallTimer(context: ChannelHandlerContext) {
        stallTimer = context.eventLoop.assumeIsolated().scheduleTask(in: idleTimeout) {
            self.stallTimer = nil
            if self.sendingRequest && self.pendingBodyWrites > 0 { self.fire(.idle, context: context) }
        }
    }

    /// A decoding or I/O error breaks the connection for good: pass it on (the
    /// response stream fails with it) and close, so an idle connection that saw
    /// one is never reused.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        cancelTimers()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        cancelTimers()
    }

    private func armHeadTimer(context: ChannelHandlerContext) {
        headTimer?.cancel()
        headTimer = context.eventLoop.assumeIsolated().scheduleTask(in: responseHeaderTimeout) {
            self.headTimer = nil
            if self.awaitingHead { self.fire(.responseHead, context: context) }
        }
    }

    /// One timer per idle period rather than one per read: when it fires it checks
    /// how long the current `read()` has been outstanding and re-arms for the rest.
    private func armIdleTimer(context: ChannelHandlerContext, at deadline: NIODeadline) {
        idleTimer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.idleTimer = nil
            guard self.receivingBody, let since = self.readPendingSince else { return }
            let expiry = since + self.idleTimeout
            if expiry <= .now() {
                self.fire(.idle, context: context)
            } else {
                self.armIdleTimer(context: context, at: expiry)
            }
        }
    }

    private func fire(_ timeout: UpstreamTimeout, context: ChannelHandlerContext) {
        cancelTimers()
        pendingBodyWrites = 0
        inExchange = false
        sendingRequest = false
        awaitingHead = false
        receivingBody = false
        context.fireErrorCaught(timeout)
        context.close(promise: nil)
    }

    private func cancelTimers() {
        headTimer?.cancel()
        idleTimer?.cancel()
        stallTimer?.cancel()
        headTimer = nil
        idleTimer = nil
        stallTimer = nil
    }
}

import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// One keep-alive HTTP/1.1 connection to one backend, owned by one upstream worker.
///
/// Ownership: each upstream worker of a backend owns exactly one
/// `UpstreamConnection` and uses it from its own task, one request at a time
/// (the talk's worker runs one request at a time). That is the invariant that
/// makes the unlocked connection state safe, and why the type is
/// `@unchecked Sendable`: an atomic flag checks it, and a second concurrent
/// ``forward(_:body:forwarding:to:)`` or ``close()`` stops the process with a
/// precondition failure instead of corrupting the stream.
///
/// The TCP connection is opened lazily by the first ``forward(_:body:forwarding:to:)``
/// and kept while the backend keeps it alive. It is replaced (closed here, opened
/// again by the next request) after a response with `Connection: close`, any
/// error, a cancelled request, or a response that did not finish: a connection is
/// never reused in the middle of an exchange.
///
/// Backpressure runs end to end: the request body is read from the client's
/// sequence only as fast as the backend's socket takes it, and the backend's
/// response is read only as fast as the ``ProxyResponseWriter`` returns, with at
/// most ``UpstreamConfiguration/responseBufferParts`` parts buffered in between.
public final class UpstreamConnection: @unchecked Sendable {
    typealias AsyncConnection = NIOAsyncChannel<UpstreamRead, HTTPClientRequestPart>
    typealias Inbound = NIOAsyncChannelInboundStream<UpstreamRead>
    typealias Outbound = NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>

    /// An open connection: the response stream's iterator and the request writer.
    ///
    /// NIOAsyncChannel lends its streams only inside `executeThenClose`, so each
    /// connection has a small scope task that calls it, hands the streams over and
    /// waits for the channel to close; closing ``channel`` is how a connection is
    /// retired, and it ends that task.
    struct Live {
        let channel: any Channel
        var inbound: Inbound.AsyncIterator
        let outbound: Outbound
    }

    public let backend: Backend
    public let configuration: UpstreamConfiguration
    private let eventLoop: any EventLoop
    /// The backend's address when its host is an IP literal: connections go
    /// straight to it. A DNS name is resolved on every connect (NIO's Happy
    /// Eyeballs), which costs a resolver thread hop and timers; an IP literal
    /// needs neither, and hedging's losers make reconnects frequent.
    private let literalAddress: SocketAddress?
    /// Set for the duration of a forward or close: enforces the one-user invariant.
    private let inUse = Atomic<Bool>(false)
    private let opened = Atomic<Int>(0)
    /// The kept-alive connection between exchanges; only touched while `inUse` is held.
    private var live: Live?

    /// A connection to `backend`, not yet open; every channel it opens runs on `eventLoop`.
    public init(
        backend: Backend,
        configuration: UpstreamConfiguration = .init(),
        eventLoop: any EventLoop = MultiThreadedEventLoopGroup.singleton.next()
    ) {
        self.backend = backend
        self.configuration = configuration
        self.eventLoop = eventLoop
        self.literalAddress = try? SocketAddress(ipAddress: backend.host, port: backend.port)
    }

    deinit {
        live?.channel.close(promise: nil)
    }

    /// How many TCP connections this object has opened so far.
    public var connectionsOpened: Int { opened.load(ordering: .relaxed) }

    /// Closes the kept-alive connection, if any; the next forward opens a new one.
    /// Call it from the owning task, never during a forward.
    public func close() async {
        acquire()
        let closing = live
        live = nil
        release()
        try? await closing?.channel.close()
    }

    /// Forwards one client request to the backend and streams the response into `writer`.
    ///
    /// Headers are rewritten as ``ProxyHeaders`` describes (hop-by-hop removed both
    /// ways, `X-Forwarded-*` and `Via` added). The body is read from `body` only if
    /// the head announces one (`Content-Length` > 0 or `Transfer-Encoding`); it goes
    /// upstream with the same framing kind, and is sent while the response is read,
    /// so a backend that answers early or echoes as it reads does not deadlock.
    ///
    /// Cancelling the calling task (the client went away) closes the upstream
    /// connection at once and throws ``UpstreamError/Kind/clientAborted``;
    /// so does `stop` (from any task), without cancelling the caller.
    ///
    /// - Parameters:
    ///   - head: the client's request head as the server decoded it.
    ///   - body: the client's request body; each element is sent as it arrives.
    ///   - forwarding: the client's address, host and scheme for `X-Forwarded-*`.
    ///   - writer: receives the response head, body and end, each awaited.
    ///   - stop: stops this forward from another task (a hedge's loser).
    /// - Returns: the final status and byte counts, for stats.
    /// - Throws: ``UpstreamError``, classified for retry (``UpstreamError/Kind/retry``)
    ///   and status (``UpstreamError/Kind/suggestedStatus``).
    public func forward<Body: AsyncSequence & Sendable>(
        _ head: HTTPRequestHead,
        body: Body,
        forwarding: ForwardedFor,
        to writer: some ProxyResponseWriter,
        stop: ForwardStop? = nil
    ) async throws(UpstreamError) -> ForwardResult where Body.Element == ByteBuffer {
        acquire()
        defer { release() }
        if Task.isCancelled {
            throw UpstreamError(
                .clientAborted,
                backend: backend.name,
                detail: "the client went away before the request was sent"
            )
        }
        let (upstreamHead, framing) = ProxyHeaders.upstreamRequest(head, forwarding: forwarding, backend: backend)

        var connection: Live
        var reused = false
        if let kept = live, kept.channel.isActive {
            connection = kept
            reused = true
        } else {
            live?.channel.close(promise: nil)
            live = nil
            connection = try await connect()
        }
        live = nil  // lent to this exchange; put back only if it ends cleanly

        let channel = connection.channel
        if let stop, !stop.attach(channel) {
            live = connection  // nothing was sent on it
            throw stop.error(backend: backend.name)
        }
        // Past this point the writer is an existential and only the upload is
        // generic, so a body-less exchange runs no unspecialized generic code.
        let writer: any ProxyResponseWriter = writer
        let outcome = await withTaskCancellationHandler {
            if framing == .none {
                return await exchange(&connection, head: upstreamHead, writer: writer)
            }
            return await exchange(&connection, head: upstreamHead, framing: framing, body: body, writer: writer)
        } onCancel: {
            channel.close(promise: nil)
        }
        let mayKeep = stop?.exchangeEnded() ?? true
        switch outcome {
        case .success(var result):
            result.reusedConnection = reused
            if result.keptAlive && mayKeep && channel.isActive && !Task.isCancelled {
                live = connection
            } else {
                result.keptAlive = false
                channel.close(promise: nil)
            }
            return result
        case .failure(let error):
            channel.close(promise: nil)
            // Closed by the stop: whatever that looked like, it was not the backend's doing.
            if let stop, stop.closedConnection, error.kind != .clientAborted { throw stop.error(backend: backend.name) }
            throw error
        }
    }

    // MARK: - Connecting

    private func connect() async throws(UpstreamError) -> Live {
        let configuration = self.configuration
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(configuration.connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
        let initialize: @Sendable (any Channel) -> EventLoopFuture<AsyncConnection> = { channel in
            channel.eventLoop.makeCompletedFuture {
                var limits = NIOHTTPDecoderLimitConfiguration()
                limits.maxHeaderFieldSize = configuration.maxResponseHeaderBytes
                limits.maxHeaderListSize = configuration.maxResponseHeaderBytes
                let sync = channel.pipeline.syncOperations
                // The encoder must sit below the decoder's handler: the decoder
                // learns each request's method from the writes passing through
                // it (a response to HEAD has no body).
                try sync.addHandler(HTTPRequestEncoder())
                try sync.addHandler(
                    ByteToMessageHandler(
                        HTTPResponseDecoder(
                            leftOverBytesStrategy: .dropBytes,
                            informationalResponseStrategy: .drop,
                            limitConfiguration: limits
                        )
                    )
                )
                try sync.addHandler(
                    UpstreamTimeoutHandler(
                        responseHeaderTimeout: configuration.responseHeaderTimeout,
                        idleTimeout: configuration.idleTimeout
                    )
                )
                try sync.addHandler(ReadBatchMarker())
                let high = max(configuration.responseBufferParts, 2)
                return try AsyncConnection(
                    wrappingChannelSynchronously: channel,
                    configuration: .init(backPressureStrategy: .init(lowWatermark: high / 2, highWatermark: high))
                )
            }
        }
        let asyncConnection: AsyncConnection
        do {
            if let literalAddress {
                asyncConnection = try await bootstrap.connect(to: literalAddress, channelInitializer: initialize)
            } else {
                asyncConnection = try await bootstrap.connect(
                    host: backend.host, port: backend.port, channelInitializer: initialize)
            }
        } catch {
            throw classifyConnect(error)
        }
        opened.add(1, ordering: .relaxed)
        let (inbound, outbound) = await withCheckedContinuation {
            (continuation: CheckedContinuation<(Inbound, Outbound), Never>) in
            Task {
                try? await asyncConnection.executeThenClose { inbound, outbound in
                    continuation.resume(returning: (inbound, outbound))
                    try await asyncConnection.channel.closeFuture.get()
                }
            }
        }
        return Live(channel: asyncConnection.channel, inbound: inbound.makeAsyncIterator(), outbound: outbound)
    }

    private func classifyConnect(_ error: any Error) -> UpstreamError {
        let timedOut: Bool
        switch error {
        case ChannelError.connectTimeout:
            timedOut = true
        case let error as NIOConnectionError:
            timedOut = error.connectionErrors.contains { failure in
                if case ChannelError.connectTimeout = failure.error { return true }
                return false
            }
        default:
            timedOut = false
        }
        if timedOut {
            return UpstreamError(
                .connectTimeout,
                backend: backend.name,
                detail: "no connection to \(backend.host):\(backend.port) within \(configuration.connectTimeout)"
            )
        }
        return UpstreamError(
            .connectFailed,
            backend: backend.name,
            detail: "cannot connect to \(backend.host):\(backend.port): \(error)"
        )
    }

    // MARK: - One exchange

    /// Sends a request without a body and streams the response; never throws,
    /// so the caller decides in one place whether the connection is kept.
    private func exchange(
        _ connection: inout Live,
        head: HTTPRequestHead,
        writer: any ProxyResponseWriter
    ) async -> Result<ForwardResult, UpstreamError> {
        do {
            try await connection.outbound.write(contentsOf: [.head(head), .end(nil)])
        } catch {
            return .failure(notSent(error))
        }
        return await receive(&connection.inbound, writer: writer, upload: nil)
    }

    /// Sends a request with a body while the response streams back; never throws.
    ///
    /// The body goes up from a child task, so a backend that answers before it
    /// has read the whole body (or echoes as it reads) does not deadlock.
    private func exchange<Body: AsyncSequence & Sendable>(
        _ connection: inout Live,
        head: HTTPRequestHead,
        framing: ProxyHeaders.RequestFraming,
        body: Body,
        writer: any ProxyResponseWriter
    ) async -> Result<ForwardResult, UpstreamError> where Body.Element == ByteBuffer {
        do {
            try await connection.outbound.write(.head(head))
        } catch {
            return .failure(notSent(error))
        }
        let upload = UploadProgress()
        let channel = connection.channel
        return await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await Self.upload(body, framing: framing, closing: channel, progress: upload)
            }
            var outcome = await receive(&connection.inbound, writer: writer, upload: upload)
            if !upload.finished {
                // The response ended (or failed) before the request body was sent:
                // the connection is mid-request and cannot be reused.
                group.cancelAll()
                channel.close(promise: nil)
                if case .success(var result) = outcome {
                    result.keptAlive = false
                    result.requestBodyBytes = upload.bytes
                    outcome = .success(result)
                }
            }
            return outcome
        }
    }

    /// The failure of writing the request head: nothing reached the backend.
    private func notSent(_ error: any Error) -> UpstreamError {
        if Task.isCancelled { return clientAborted("the client went away", upload: nil) }
        return UpstreamError(
            .closedBeforeRequestSent,
            backend: backend.name,
            detail: "the connection closed before the request was sent: \(error)"
        )
    }

    /// Reads the response head and body from the backend and writes them to `writer`.
    private func receive(
        _ inbound: inout Inbound.AsyncIterator,
        writer: any ProxyResponseWriter,
        upload: UploadProgress?
    ) async -> Result<ForwardResult, UpstreamError> {
        let responseHead: HTTPResponseHead
        do {
            switch try await Self.firstPart(&inbound) {
            case .head(let head)?:
                responseHead = head
            case .body?, .end?:
                return .failure(
                    failure(HTTPParserError.invalidInternalState, headReceived: false, bytes: 0, upload: upload)
                )
            case nil:
                return .failure(failure(nil, headReceived: false, bytes: 0, upload: upload))
            }
        } catch {
            return .failure(failure(error, headReceived: false, bytes: 0, upload: upload))
        }

        do {
            try await writer.writeHead(ProxyHeaders.clientResponse(responseHead))
        } catch {
            return .failure(clientAborted("writing the response head to the client failed: \(error)", upload: upload))
        }

        var responseBytes = 0
        while true {
            let read: UpstreamRead?
            do {
                read = try await inbound.next()
            } catch {
                return .failure(failure(error, headReceived: true, bytes: responseBytes, upload: upload))
            }
            let part: HTTPClientResponsePart?
            switch read {
            case .part(let value)?: part = value
            case .batchEnd?:
                do {
                    try await writer.flush()
                } catch {
                    return .failure(clientAborted("writing the response to the client failed: \(error)", upload: upload))
                }
                continue
            case nil: part = nil
            }
            switch part {
            case .body(let buffer)?:
                responseBytes += buffer.readableBytes
                do {
                    try await writer.writeBody(buffer)
                } catch {
                    return .failure(
                        clientAborted("writing the response body to the client failed: \(error)", upload: upload)
                    )
                }
            case .end(let trailers)?:
                do {
                    try await writer.end(trailers: trailers)
                } catch {
                    return .failure(clientAborted("ending the response to the client failed: \(error)", upload: upload))
                }
                return .success(
                    ForwardResult(
                        status: responseHead.status,
                        requestBodyBytes: upload?.bytes ?? 0,
                        responseBodyBytes: responseBytes,
                        reusedConnection: false,
                        keptAlive: responseHead.isKeepAlive
                    )
                )
            case .head?:
                return .failure(
                    failure(
                        HTTPParserError.invalidInternalState,
                        headReceived: true,
                        bytes: responseBytes,
                        upload: upload
                    )
                )
            case nil:
                return .failure(failure(nil, headReceived: true, bytes: responseBytes, upload: upload))
            }
        }
    }

    /// The first part of a response. Batch ends before it close the batch that
    /// ended the previous response on this connection: nothing to flush.
    private static func firstPart(_ inbound: inout Inbound.AsyncIterator) async throws -> HTTPClientResponsePart? {
        while let read = try await inbound.next() {
            if case .part(let part) = read { return part }
        }
        return nil
    }

    /// Classifies a failure of the response stream: `error` is nil for an early end of stream.
    private func failure(
        _ error: (any Error)?,
        headReceived: Bool,
        bytes: Int,
        upload: UploadProgress?
    ) -> UpstreamError {
        if Task.isCancelled || error is CancellationError {
            return clientAborted("the client went away", upload: upload, responseBytes: bytes)
        }
        if let clientError = upload?.clientError {
            return clientAborted(clientError, upload: upload, responseBytes: bytes)
        }
        let sent = upload?.bytes ?? 0
        func make(_ kind: UpstreamError.Kind, _ detail: String) -> UpstreamError {
            UpstreamError(kind, backend: backend.name, detail: detail, requestBodyBytes: sent, responseBodyBytes: bytes)
        }
        if headReceived {
            switch error {
            case nil:
                return make(.responseTruncated, "the backend closed the connection before the response body ended")
            case UpstreamTimeout.idle?:
                return make(.responseTruncated, "no response body bytes for \(configuration.idleTimeout)")
            case let error?: return make(.responseTruncated, "the response body broke off: \(error)")
            }
        }
        switch error {
        case nil:
            return make(.failedAfterRequestSent, "the backend closed the connection without a response")
        case UpstreamTimeout.responseHead?:
            return make(.responseTimeout, "no response head within \(configuration.responseHeaderTimeout)")
        case UpstreamTimeout.idle?:
            return make(
                .responseTimeout,
                "the backend stopped reading the request body for \(configuration.idleTimeout)"
            )
        case HTTPParserError.invalidEOFState?:
            return make(.failedAfterRequestSent, "the backend closed the connection in the middle of the response head")
        case let error? where error is HTTPParserError:
            return make(.invalidResponse, "the backend sent an invalid HTTP response: \(error)")
        case let error?:
            return make(.failedAfterRequestSent, "the connection failed after the request was sent: \(error)")
        }
    }

    private func clientAborted(_ detail: String, upload: UploadProgress?, responseBytes: Int = 0) -> UpstreamError {
        UpstreamError(
            .clientAborted,
            backend: backend.name,
            detail: detail,
            requestBodyBytes: upload?.bytes ?? 0,
            responseBodyBytes: responseBytes
        )
    }

    /// Sends the request body: runs in a child task beside ``receive(_:writer:upload:)``.
    ///
    /// A failure of the client's body (or a body that does not match its
    /// `Content-Length`) is recorded in `progress` and closes the upstream
    /// connection, which ends the response side too. A failed upstream write just
    /// stops: the response side sees the same broken connection and classifies it.
    ///
    /// Each piece is written straight to the channel and awaited until the socket
    /// took it, so at most one piece (plus the kernel's buffer) is in flight. The
    /// async writer's backpressure is not enough here: it learns that the channel
    /// became unwritable only after a hop to the event loop, and a fast body can run
    /// far ahead in the meantime (over 100 MB was seen on a loaded machine).
    private static func upload<Body: AsyncSequence & Sendable>(
        _ body: Body,
        framing: ProxyHeaders.RequestFraming,
        closing channel: any Channel,
        progress: UploadProgress
    ) async where Body.Element == ByteBuffer {
        var expected: Int?
        if case .contentLength(let length) = framing { expected = length }
        var sent = 0
        var iterator = body.makeAsyncIterator()
        do {
            while true {
                let chunk: ByteBuffer?
                do {
                    chunk = try await iterator.next()
                } catch {
                    progress.clientFailed("reading the request body from the client failed: \(error)")
                    channel.close(promise: nil)
                    return
                }
                guard let chunk else { break }
                guard chunk.readableBytes > 0 else { continue }
                sent += chunk.readableBytes
                if let expected, sent > expected {
                    progress.clientFailed("the request body is longer than its Content-Length (\(expected))")
                    channel.close(promise: nil)
                    return
                }
                // Counted before the write completes: the backend may answer (and the
                // response side read the count) as soon as the bytes reach it.
                progress.add(chunk.readableBytes)
                try await channel.writeAndFlush(HTTPClientRequestPart.body(.byteBuffer(chunk))).get()
            }
            if let expected, sent != expected {
                progress.clientFailed("the request body ended after \(sent) of \(expected) bytes")
                channel.close(promise: nil)
                return
            }
            try await channel.writeAndFlush(HTTPClientRequestPart.end(nil)).get()
            progress.finish()
        } catch {
            // The upstream write failed; the response side reports the broken connection.
        }
    }
}

/// What the upload task has done, read by the response side; shared between the
/// two tasks of one exchange.
final class UploadProgress: Sendable {
    private struct State {
        var bytes = 0
        var finished = false
        var clientError: String?
    }
    private let state = Mutex(State())

    var bytes: Int { state.withLock { $0.bytes } }
    /// The whole body and its end were written upstream.
    var finished: Bool { state.withLock { $0.finished } }
    /// Why the client's side of the upload failed, if it did.
    var clientError: String? { state.withLock { $0.clientError } }

    func add(_ count: Int) { state.withLock { $0.bytes += count } }
    func finish() { state.withLock { $0.finished = true } }
    func clientFailed(_ reason: String) { state.withLock { $0.clientError = reason } }
}

extension UpstreamConnection {
    private func acquire() {
        let (exchanged, _) = inUse.compareExchange(expected: false, desired: true, ordering: .acquiring)
        precondition(exchanged, "UpstreamConnection to \(backend.name) used by two tasks at once")
    }

    private func release() {
        inUse.store(false, ordering: .releasing)
    }
}

/// Stops one ``UpstreamConnection/forward(_:body:forwarding:to:stop:)`` from
/// another task: its connection is closed at once (or, before it is chosen,
/// the forward sends nothing) and the forward throws
/// ``UpstreamError/Kind/clientAborted``, which does not count against the
/// backend. A hedged request's losers are stopped this way.
///
/// ``stopLettingFinish()``, with `finishWithin`, lets a forward that has its
/// connection go on instead, for at most that long: its response is the
/// writer's to throw away (a hedge's ``HedgeCopyWriter`` does, up to
/// ``HedgePolicy/loserFinishBytes``), and a response that ends in time
/// leaves the connection kept alive (if the backend keeps it), never reused
/// mid-response. At the deadline the connection is closed as by ``stop()``.
/// HTTP/1.1 has no way to cancel one request but closing its connection;
/// letting it finish saves both ends a new connection, and most backends go
/// on working on a request whose connection closed anyway.
public final class ForwardStop: Sendable {
    private struct State {
        var channel: (any Channel)?
        var stopped = false
        /// The stop (or its deadline) closed the connection.
        var closed = false
        /// The forward's exchange ended: nothing closes the connection from here now.
        var over = false
        var deadline: Scheduled<Void>?
    }

    private let state = Mutex(State())
    private let finishWithin: Duration?

    public init(finishWithin: Duration? = nil) {
        self.finishWithin = finishWithin
    }

    /// Stops the forward: now, or as soon as it has its connection.
    public func stop() {
        let channel: (any Channel)? = state.withLock { state in
            state.stopped = true
            return Self.closing(&state)
        }
        channel?.close(promise: nil)
    }

    /// Stops the forward, letting it finish within `finishWithin` if it has
    /// its connection (without `finishWithin`, or before that: ``stop()``).
    public func stopLettingFinish() {
        guard let finishWithin else { return stop() }
        state.withLock { state in
            guard !state.stopped else { return }
            state.stopped = true
            guard let channel = state.channel, !state.over else { return }
            state.deadline = channel.eventLoop.scheduleTask(in: .nanoseconds(finishWithin.nanoseconds)) {
                self.finishTimedOut()
            }
        }
    }

    private func finishTimedOut() {
        let channel = state.withLock { Self.closing(&$0) }
        channel?.close(promise: nil)
    }

    /// The channel to close now, if the exchange is still on; marks it closed.
    private static func closing(_ state: inout State) -> (any Channel)? {
        guard let channel = state.channel, !state.over, !state.closed else { return nil }
        state.closed = true
        return channel
    }

    /// Whether the stop closed the forward's connection: its failure is the
    /// stop's doing, not the backend's.
    var closedConnection: Bool { state.withLock { $0.closed } }

    /// Whether the forward got its connection (and so may have sent the request).
    public var reachedConnection: Bool { state.withLock { $0.channel != nil } }

    /// Ties the forward's connection to this stop; false when it was already stopped.
    func attach(_ channel: any Channel) -> Bool {
        state.withLock { state in
            guard !state.stopped else { return false }
            state.channel = channel
            return true
        }
    }

    /// The forward's exchange is over: from now on nothing here closes its
    /// connection. Returns whether the connection may be kept (the stop has
    /// not closed it, even if the channel has not noticed yet).
    func exchangeEnded() -> Bool {
        let (deadline, closed) = state.withLock { state in
            state.over = true
            defer { state.deadline = nil }
            return (state.deadline, state.closed)
        }
        deadline?.cancel()
        return !closed
    }

    func error(backend: String) -> UpstreamError {
        UpstreamError(.clientAborted, backend: backend, detail: "stopped: another copy of the request answered first")
    }
}

import BalancerCore
import Logging
import NIOCore
import NIOExtras
import NIOHTTP1
import NIOPosix
import ServiceLifecycle

/// The HTTP/1.1 server in front of a ``Balancer``: a swift-service-lifecycle
/// `Service`.
///
/// ``bind(configuration:balancer:eventLoopGroup:logger:)`` opens the listening
/// socket (so a bad address or a port in use fails before anything runs);
/// ``run()`` accepts connections and serves each in a child task of a
/// discarding task group, through `NIOAsyncChannel`. Keep-alive and pipelined
/// requests are answered in order on each connection.
///
/// On graceful shutdown (SIGTERM/SIGINT through the `ServiceGroup`) it turns
/// `/readyz` to 503, stops accepting, starts the balancer's graceful shutdown
/// with the configured grace period (queued and running jobs finish; new ones
/// get 503 `shutting_down`), answers what is in flight with `Connection:
/// close`, closes idle connections, and returns when every connection is closed.
public final class HTTPServer: Service, Sendable {
    typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>

    /// What the accept loop gets for each new connection.
    enum Accepted: Sendable {
        case http(Connection)
        /// Over `max_connections`: answered 503 and closed by the pipeline.
        case refused
    }

    /// A listening socket and what stops it accepting.
    struct Listening: Sendable {
        let listener: Routes.Listener
        let channel: NIOAsyncChannel<Accepted, Never>
        let quiescing: ServerQuiescingHelper
    }

    public let configuration: ServerConfiguration
    /// The jobs pool's balancer.
    public let balancer: Balancer
    /// The upstream pools, in configuration order; ``Routes`` says which
    /// paths go to which.
    public let upstreams: [UpstreamPool]
    /// Readiness and uptime.
    public let state: ServerState
    /// The address actually bound (its port is the real one when 0 was asked for).
    public let localAddress: SocketAddress
    /// The admin listener's address, when `admin_port` is set.
    public let adminAddress: SocketAddress?
    private let listening: [Listening]
    private let routes: Routes
    private let router: Router
    /// The metrics and the access log, each `nil` when off.
    let observer: RequestObserver
    /// How long a stopped server waits for queued access-log lines to be written.
    static let accessLogFlushTimeout = Duration.seconds(2)
    private let logger: Logger

    /// The port actually bound.
    public var port: Int { localAddress.port ?? configuration.port }
    /// The admin listener's port actually bound, when `admin_port` is set.
    public var adminPort: Int? { adminAddress.map { $0.port ?? configuration.adminPort ?? 0 } }

    private init(
        configuration: ServerConfiguration,
        balancer: Balancer,
        upstreams: [UpstreamPool],
        state: ServerState,
        listening: [Listening],
        accessLog: AccessLogSink?,
        logger: Logger
    ) {
        self.configuration = configuration
        self.balancer = balancer
        self.upstreams = upstreams
        self.state = state
        self.listening = listening
        self.localAddress = listening[0].channel.channel.localAddress!
        self.adminAddress = listening.first { $0.listener == .admin }?.channel.channel.localAddress
        self.routes = Routes(pools: configuration.effectivePools, upstreams: upstreams, adminOnMain: listening.count == 1)
        let metrics =
            configuration.metrics
            ? ServerMetrics(workers: balancer.configuration.workers, upstreams: upstreams.map { ($0.poolName, $0.balancer.configuration.workers) })
            : nil
        let accessLogQueue = configuration.accessLog ? AccessLogQueue(accessLog ?? .standardOutput) { [logger] in
            logger.warning("access log: its output does not keep up; dropping lines (counted in /stats as access_log.dropped)")
        } : nil
        self.observer = RequestObserver(metrics: metrics, accessLog: accessLogQueue)
        for upstream in upstreams {
            guard let latency = metrics?.pool(upstream.poolName)?.latency else { continue }
            upstream.whenWorkersLeave { latency.retire($0) }
        }
        self.router = Router(
            balancer: balancer, registry: .builtIn, limits: configuration.jobLimits, state: state, upstreams: upstreams,
            metrics: metrics, accessLog: accessLogQueue)
        self.logger = logger
    }

    /// Opens the listening socket at `configuration.host`:`configuration.port`,
    /// and the admin listener at `configuration.adminPort` when set.
    ///
    /// - Parameters:
    ///   - upstreams: the upstream pools of `configuration.effectivePools`.
    ///   - accessLog: where access-log lines go when `access_log` is on;
    ///     standard output if `nil`.
    /// - Throws: ``BindError`` with a one-line message (address in use, bad host).
    public static func bind(
        configuration: ServerConfiguration,
        balancer: Balancer,
        upstreams: [UpstreamPool] = [],
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        accessLog: AccessLogSink? = nil,
        logger: Logger
    ) async throws -> HTTPServer {
        let state = ServerState()
        var listening = [
            try await listen(.main, port: configuration.port, configuration: configuration, state: state, eventLoopGroup: eventLoopGroup)
        ]
        if let adminPort = configuration.adminPort {
            do {
                listening.append(
                    try await listen(.admin, port: adminPort, configuration: configuration, state: state, eventLoopGroup: eventLoopGroup))
            } catch {
                try? await listening[0].channel.channel.close()
                throw error
            }
        }
        let server = HTTPServer(
            configuration: configuration,
            balancer: balancer,
            upstreams: upstreams,
            state: state,
            listening: listening,
            accessLog: accessLog,
            logger: logger
        )
        var metadata: Logger.Metadata = [
            "address": "\(configuration.host):\(server.port)",
            "workers": "\(configuration.workers)",
            "strategy": "\(configuration.strategy.rawValue)",
        ]
        if let adminPort = server.adminPort { metadata["admin_address"] = "\(configuration.host):\(adminPort)" }
        logger.info("listening", metadata: metadata)
        return server
    }

    /// Opens one listening socket on `configuration.host`.
    private static func listen(
        _ listener: Routes.Listener,
        port: Int,
        configuration: ServerConfiguration,
        state: ServerState,
        eventLoopGroup: any EventLoopGroup
    ) async throws -> Listening {
        let quiescing = ServerQuiescingHelper(group: eventLoopGroup)
        let counter = ConnectionCounter()
        let maxConnections = configuration.maxConnections
        let limits = ConnectionGuard.Limits(
            idleTimeout: .milliseconds(configuration.idleTimeoutMilliseconds),
            headerTimeout: .milliseconds(configuration.headerTimeoutMilliseconds),
            bodyTimeout: .milliseconds(configuration.bodyTimeoutMilliseconds),
            sendTimeout: .milliseconds(configuration.sendTimeoutMilliseconds),
            maxHeaderBytes: configuration.maxHeaderBytes
        )
        var decoderLimits = NIOHTTPDecoderLimitConfiguration()
        decoderLimits.maxHeaderFieldSize = configuration.maxHeaderBytes
        decoderLimits.maxHeaderListSize = configuration.maxHeaderBytes
        decoderLimits.maxHeaderFieldCount = 1_000
        let decoderLimitConfiguration = decoderLimits

        let bootstrap = ServerBootstrap(group: eventLoopGroup)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(quiescing.makeServerChannelHandler(channel: channel))
                }
            }
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)

        let serverChannel: NIOAsyncChannel<Accepted, Never>
        do {
            serverChannel = try await bootstrap.bind(
                host: configuration.host,
                port: port,
                serverBackPressureStrategy: nil
            ) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let open = counter.open()
                    channel.closeFuture.whenComplete { _ in counter.close() }
                    if open > maxConnections {
                        try channel.pipeline.syncOperations.addHandler(RefuseConnectionHandler())
                        return Accepted.refused
                    }
                    let connectionGuard = ConnectionGuard(limits: limits, stats: state.connections)
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(ConnectionGuard.ByteWatcher(connectionGuard))
                    try sync.configureHTTPServerPipeline(
                        withPipeliningAssistance: false,  // NIOAsyncChannel answers requests in order
                        withErrorHandling: false,  // ConnectionGuard answers parse errors as JSON
                        withOutboundHeaderValidation: false,  // our headers are fixed strings and numbers
                        withEncoderConfiguration: .init(),
                        withDecoderLimitConfiguration: decoderLimitConfiguration
                    )
                    try sync.addHandler(connectionGuard)
                    let connection = try Connection(
                        wrappingChannelSynchronously: channel,
                        configuration: .init(backPressureStrategy: .init(lowWatermark: 2, highWatermark: 16))
                    )
                    return Accepted.http(connection)
                }
            }
        } catch {
            throw BindError(host: configuration.host, port: port, underlying: error)
        }
        return Listening(listener: listener, channel: serverChannel, quiescing: quiescing)
    }

    /// Serves until graceful shutdown (or cancellation) and every connection has closed.
    ///
    /// - Throws: the error that ended the accept loop, if it ended other than
    ///   by a drain: the process then exits non-zero instead of living on
    ///   without a listener.
    public func run() async throws {
        let acceptFailure: (any Error)? = await withGracefulShutdownHandler {
            await withTaskGroup(of: (any Error)?.self) { listeners -> (any Error)? in
                for listening in self.listening {
                    listeners.addTask { await self.accept(on: listening) }
                }
                // A drain closes every listener; one that fails closes the others.
                var failure: (any Error)?
                for await ended in listeners {
                    guard let ended, failure == nil else { continue }
                    failure = ended
                    for listening in self.listening { listening.quiescing.initiateShutdown(promise: nil) }
                }
                return failure
            }
        } onGracefulShutdown: {
            self.beginDrain()
        }
        // Every connection has closed: no more lines come.
        await observer.accessLog?.finish(within: Self.accessLogFlushTimeout)
        if let acceptFailure, !state.isDraining {
            beginDrain()
            throw acceptFailure
        }
        logger.info("server stopped", metadata: ["address": "\(configuration.host):\(port)"])
        // After a drain begun by ``beginDrain()`` rather than by the group,
        // stay until the group shuts this service down, so it does not see it end early.
        try? await gracefulShutdown()
    }

    /// Every service `balancer serve` runs, in `ServiceGroup` order: the
    /// balancers first (they shut down last), the upstream pools' health
    /// checks, then this server (it shuts down first and drains the balancers).
    public func services(gracePeriod: Duration) -> [ServiceGroupConfiguration.ServiceConfiguration] {
        [.init(service: BalancerService(balancer: balancer, gracePeriod: gracePeriod))]
            + upstreams.map { .init(service: BalancerService(balancer: $0.balancer, gracePeriod: gracePeriod)) }
            + upstreams.map { .init(service: $0) }
            + [.init(service: self)]
    }

    /// Accepts connections on one listener and serves each in a child task,
    /// until the listener closes; returns the error that ended it, if any.
    private func accept(on listening: Listening) async -> (any Error)? {
        await withDiscardingTaskGroup { group -> (any Error)? in
            do {
                try await listening.channel.executeThenClose { inbound in
                    for try await accepted in inbound {
                        guard case .http(let connection) = accepted else { continue }
                        group.addTask { await self.serve(connection, on: listening.listener) }
                    }
                }
                return nil
            } catch {
                logger.error("accepting connections failed", metadata: ["error": "\(error)"])
                return error
            }
        }
    }

    /// Starts the drain: not ready, no new connections, jobs finish within the
    /// grace period, every connection closes after its answer.
    public func beginDrain() {
        guard state.beginDraining() else { return }
        logger.info(
            "draining: finishing in-flight jobs",
            metadata: ["grace_period_ms": "\(configuration.gracePeriodMilliseconds)"]
        )
        balancer.shutdown(gracePeriod: .milliseconds(configuration.gracePeriodMilliseconds))
        for upstream in upstreams {
            upstream.balancer.shutdown(gracePeriod: .milliseconds(configuration.gracePeriodMilliseconds))
        }
        for listening in listening { listening.quiescing.initiateShutdown(promise: nil) }
    }

    // MARK: - One connection

    /// Answers requests on one connection in order until it closes. If the
    /// client goes away mid-job, the job's task is cancelled: a queued job
    /// never runs, a running one's result is dropped.
    private func serve(_ connection: Connection, on listener: Routes.Listener) async {
        let channel = connection.channel
        await withTaskCancellationHandler {
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    do {
                        try await self.answerRequests(on: connection, from: listener)
                    } catch {
                        self.logger.debug("connection ended", metadata: ["error": "\(error)"])
                    }
                }
                group.addTask {
                    // Resolves when the peer goes away (or we close): cancels the request loop.
                    try? await channel.closeFuture.get()
                }
                _ = await group.next()
                group.cancelAll()
            }
        } onCancel: {
            channel.close(promise: nil)
        }
    }

    private func answerRequests(on connection: Connection, from listener: Routes.Listener) async throws {
        let maxBody = configuration.maxBodyBytes
        try await connection.executeThenClose { inbound, outbound in
            var parts = inbound.makeAsyncIterator()
            while let part = try await parts.next() {
                guard case .head(let head) = part else { continue }
                let requestID = RequestID.of(head.headers)
                let target = routes.target(for: head.uri, on: listener)
                if case .upstream(let upstream) = target {
                    guard try await proxy(head, to: upstream, requestID: requestID, parts: &parts, connection: connection, outbound: outbound)
                    else { return }
                    continue
                }
                if let length = head.headers.first(name: "content-length").flatMap({ Int($0) }), length > maxBody {
                    try await refuseBody(
                        head, requestID: requestID, limit: maxBody, channel: connection.channel, parts: &parts, outbound: outbound)
                    return
                }
                if head.headers.first(name: "expect")?.lowercased() == "100-continue" {
                    try await outbound.write(.head(HTTPResponseHead(version: head.version, status: .continue)))
                }
                var body: ByteBuffer?
                var ended = false
                reading: while let part = try await parts.next() {
                    switch part {
                    case .body(var chunk):
                        if (body?.readableBytes ?? 0) + chunk.readableBytes > maxBody {
                            try await refuseBody(
                                head, requestID: requestID, limit: maxBody, channel: connection.channel, parts: &parts,
                                outbound: outbound)
                            return
                        }
                        if body == nil {
                            body = chunk
                        } else {
                            body!.writeBuffer(&chunk)
                        }
                    case .end:
                        ended = true
                        break reading
                    case .head:
                        return  // cannot happen: the decoder ends every request
                    }
                }
                guard ended else { return }
                let started = observer.isActive ? ContinuousClock.now : nil
                let response = await router.respond(to: head, body: body, target: target)
                // Recorded before the answer goes out, so a client that reads
                // /stats after its answer finds its request counted.
                if let started {
                    observer.observe(
                        RequestRecord(
                            method: head.method, uri: head.uri, requestID: requestID, status: response.status,
                            pool: response.pool, served: response.served, total: .now - started,
                            bytesIn: body?.readableBytes ?? 0, bytesOut: response.body.readableBytes))
                }
                // An answer made once the drain has begun is the connection's
                // last, whether or not the guard's quiesce event has reached it yet.
                let keepAlive = head.isKeepAlive && !state.isDraining
                try await write(response, for: head, requestID: requestID, keepAlive: keepAlive, to: outbound)
                if !keepAlive { return }
            }
        }
    }

    /// Answers 413 before reading the rest of the body, then closes the
    /// connection without resetting it, discarding what the client still sends.
    private func refuseBody(
        _ head: HTTPRequestHead,
        requestID: String,
        limit: Int,
        channel: any Channel,
        parts: inout NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator,
        outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    ) async throws {
        let response = Response(.bodyTooLarge(limit: limit), allocator: channel.allocator)
        try await write(response, for: head, requestID: requestID, keepAlive: false, to: outbound)
        // Refused before any route took it (proxied requests stream instead).
        observe(head, requestID: requestID, error: response, pool: .server)
        lingeringClose(channel)
        while try await parts.next() != nil {}
    }

    func write(
        _ response: Response,
        for request: HTTPRequestHead,
        requestID: String,
        keepAlive: Bool,
        to outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    ) async throws {
        var headers = HTTPHeaders()
        headers.reserveCapacity(5 + response.headers.count)
        headers.add(name: "content-type", value: response.contentType)
        headers.add(name: "content-length", value: String(response.body.readableBytes))
        headers.add(name: RequestID.headerName, value: requestID)
        if !keepAlive {
            headers.add(name: "connection", value: "close")
        } else if request.version.major == 1 && request.version.minor == 0 {
            headers.add(name: "connection", value: "keep-alive")
        }
        for (name, value) in response.headers { headers.add(name: name, value: value) }
        let head = HTTPResponseHead(version: request.version, status: response.status, headers: headers)
        try await outbound.write(contentsOf: [.head(head), .body(.byteBuffer(response.body)), .end(nil)])
    }

    /// Records an error answered before a pool could time it (no worker, no
    /// total time): its status counts, and it gets its access-log line.
    func observe(_ head: HTTPRequestHead, requestID: String, error response: Response, pool: PoolName) {
        guard observer.isActive else { return }
        observer.observe(
            RequestRecord(
                method: head.method, uri: head.uri, requestID: requestID, status: response.status, pool: pool,
                served: nil, total: .zero, bytesIn: 0, bytesOut: response.body.readableBytes))
    }
}

/// The listening socket could not be opened: one line for the operator.
public struct BindError: Error, CustomStringConvertible {
    public var host: String
    public var port: Int
    public var underlying: any Error

    public var description: String {
        var reason = "\(underlying)"
        if let io = underlying as? IOError {
            switch io.errnoCode {
            case 98: reason = "address already in use (is another server on port \(port)?)"  // EADDRINUSE
            case 99: reason = "address not available on this machine"  // EADDRNOTAVAIL
            case 13: reason = "permission denied (ports below 1024 need privileges)"  // EACCES
            default: reason = io.description
            }
        }
        return "cannot listen on \(host):\(port): \(reason)"
    }
}

/// Answers 503 `too_many_connections` on a connection over `max_connections`, and closes it.
final class RefuseConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    func channelActive(context: ChannelHandlerContext) {
        let body = APIError.tooManyConnections.body(allocator: context.channel.allocator)
        var out = context.channel.allocator.buffer(capacity: 160 + body.readableBytes)
        out.writeString(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: \(body.readableBytes)\r\n"
                + "retry-after: \(APIError.retryAfterSeconds)\r\n\(RequestID.headerName): \(RequestID.generate())\r\n"
                + "connection: close\r\n\r\n"
        )
        out.writeImmutableBuffer(body)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(NIOAny(out)).whenComplete { _ in
            loopBound.value.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A tiny HTTP/1.1 backend for the upstream tests, on 127.0.0.1.
///
/// In `.http` mode the path picks the behaviour:
/// - `/echo`: answers at once and streams the request body back as it arrives
///   (chunked); every request header comes back as `x-req-<name>`, plus
///   `x-req-method` and `x-req-uri`.
/// - `/bytes?n=N`: `N` bytes with `Content-Length`, written 64 KiB at a time
///   with backpressure (``bytesWritten`` counts what was handed to the socket).
/// - `/chunked?parts=P`: `P` chunks of `part-<i>;` without a length, then trailer `x-checksum: P`.
/// - `/whole?n=N`: `N` bytes with `Content-Length`, head, body and end in one
///   socket write (a small one reaches the proxy in one read).
/// - `/pause`: sends a chunked head and the chunk `first;`, waits until
///   ``releasePauses()`` (or 10 s, or the connection closes), then sends
///   `second;` and the end; ``pausesReleased`` says whether the wait is over.
/// - `/sink[?slow=1]`: reads the body (``bytesReceivedBySink`` counts it) and answers `x-received-bytes`.
/// - `/hang`: reads the request and never answers.
/// - `/hang-body`: sends a head announcing 100 bytes, 10 of them, then nothing.
/// - `/reset?after_ms=N`: reads the request, waits `N` ms and closes without answering.
/// - `/truncate`: sends a head announcing 1 000 000 bytes, 1000 of them, then closes.
/// - `/close`: answers with `Connection: close` and closes.
/// - `/hop`: answers with hop-by-hop headers that must not reach the client.
/// - `/stall-upload`: never reads the request body (nor answers).
/// - `/unsolicited`: answers 200, then 300 ms later sends an unrequested 408 on the idle connection.
/// - `/status?code=C`: answers status `C`.
/// - `/delayed` (and paths under it): answers `port <port>` after the backend's `responseDelay`;
///   a connection closed while it waits is counted in ``disconnectsWhileDelayed``.
/// - `/healthz`: 200 while ``isHealthy`` (settable), else 503; counted in ``healthChecks``.
/// Every response carries `x-connection-id`, the number of the TCP connection.
///
/// `.garbage` answers any bytes with bytes that are not HTTP; `.raw(text)`
/// answers the first bytes of each connection with `text` and closes; `.neverAccept`
/// listens with a backlog of 1 and never accepts, so connects beyond the backlog hang.
final class UpstreamTestBackend: Sendable {
    enum Mode: Sendable { case http, garbage, raw(String), neverAccept }

    let port: Int
    /// How long `/delayed` waits before answering.
    let responseDelay: Duration
    private let serverChannel: any Channel
    private let received = Atomic<Int>(0)
    private let delayedDisconnects = Atomic<Int>(0)
    private let balancerHeaders = Atomic<Int>(0)
    private let accepted: Atomic<Int>
    private let written: Atomic<Int>
    private let sinkReceived = Atomic<Int>(0)
    private let healthy = Atomic<Bool>(true)
    private let healthCount = Atomic<Int>(0)
    private let released = Atomic<Bool>(false)
    private let socketBytes: SocketWriteCounter.Total
    private let unserved: Unserved
    private let children: Mutex<[ObjectIdentifier: any Channel]>
    private let running: Mutex<Task<Void, Never>?>

    /// TCP connections accepted so far.
    var connectionsAccepted: Int { accepted.load(ordering: .relaxed) }
    /// `/healthz` requests answered so far.
    var healthChecks: Int { healthCount.load(ordering: .relaxed) }
    /// Whether `/healthz` answers 200 (else 503).
    var isHealthy: Bool {
        get { healthy.load(ordering: .relaxed) }
        set { healthy.store(newValue, ordering: .relaxed) }
    }
    /// Request body bytes `/sink` has read so far.
    var bytesReceivedBySink: Int { sinkReceived.load(ordering: .relaxed) }
    /// Response body bytes handed to the async writer by `/bytes`.
    var bytesWritten: Int { written.load(ordering: .relaxed) }
    /// Bytes of all responses the kernel has accepted on the backend's sockets (head and framing included).
    var bytesWrittenToSockets: Int { socketBytes.value }
    /// Request heads received so far, on any path.
    var requestsReceived: Int { received.load(ordering: .relaxed) }
    /// `/delayed` requests whose connection closed before the answer.
    var disconnectsWhileDelayed: Int { delayedDisconnects.load(ordering: .relaxed) }
    /// Requests that arrived with a header whose name starts `x-balancer-`.
    var requestsWithBalancerHeaders: Int { balancerHeaders.load(ordering: .relaxed) }
    /// Connections open now (closed ones leave once their close completes).
    var openConnections: Int { children.withLock { $0.count } }
    /// Whether `/pause` responses went on (the test released them, or they timed out).
    var pausesReleased: Bool { released.load(ordering: .relaxed) }

    /// Lets every `/pause` response, waiting or to come, send its second chunk and end.
    func releasePauses() { released.store(true, ordering: .relaxed) }

    private init(
        port: Int,
        responseDelay: Duration = .zero,
        serverChannel: any Channel,
        socketBytes: SocketWriteCounter.Total = .init(),
        unserved: Unserved = .init()
    ) {
        self.port = port
        self.responseDelay = responseDelay
        self.unserved = unserved
        self.socketBytes = socketBytes
        self.serverChannel = serverChannel
        self.accepted = Atomic(0)
        self.written = Atomic(0)
        self.children = Mutex([:])
        self.running = Mutex(nil)
    }

    /// Starts a backend on `port` (0 for an ephemeral one).
    static func start(mode: Mode = .http, port: Int = 0, responseDelay: Duration = .zero) async throws -> UpstreamTestBackend {
        let group = MultiThreadedEventLoopGroup.singleton
        switch mode {
        case .http:
            let counter = SocketWriteCounter.Total()
            let unserved = Unserved()
            let server = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .bind(host: "127.0.0.1", port: port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(SocketWriteCounter(counter))
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withPipeliningAssistance: false)
                        let connection = try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(
                            wrappingChannelSynchronously: channel
                        )
                        unserved.add(connection)
                        return connection
                    }
                }
            let backend = UpstreamTestBackend(
                port: server.channel.localAddress!.port!,
                responseDelay: responseDelay,
                serverChannel: server.channel,
                socketBytes: counter,
                unserved: unserved
            )
            let task = Task {
                _ = try? await server.executeThenClose { inbound in
                    await withDiscardingTaskGroup { group in
                        do {
                            for try await connection in inbound {
                                unserved.remove(connection)
                                let id = backend.accepted.add(1, ordering: .relaxed).newValue
                                backend.track(connection.channel)
                                group.addTask { await backend.serve(connection, id: id) }
                            }
                        } catch {}
                    }
                }
            }
            backend.running.withLock { $0 = task }
            return backend
        case .garbage:
            let channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(GarbageHandler())
                    }
                }
                .bind(host: "127.0.0.1", port: port).get()
            return UpstreamTestBackend(port: channel.localAddress!.port!, serverChannel: channel)
        case .raw(let text):
            let channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(RawAnswerHandler(answer: text))
                    }
                }
                .bind(host: "127.0.0.1", port: port).get()
            return UpstreamTestBackend(port: channel.localAddress!.port!, serverChannel: channel)
        case .neverAccept:
            let channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1)
                .serverChannelOption(.autoRead, value: false)
                .bind(host: "127.0.0.1", port: port).get()
            return UpstreamTestBackend(port: channel.localAddress!.port!, serverChannel: channel)
        }
    }

    /// Stops listening, closes every open connection, and waits for the serving tasks.
    func stop() async {
        try? await serverChannel.close()
        let open = children.withLock { Array($0.values) }
        for channel in open { try? await channel.close() }
        let task = running.withLock { $0 }
        await task?.value
        await unserved.closeAll()
    }

    /// Closes every open connection but keeps listening: a backend whose
    /// keep-alive timeout ran out.
    func closeClientConnections() async {
        let open = children.withLock { Array($0.values) }
        for channel in open { try? await channel.close() }
    }

    private func track(_ channel: any Channel) {
        let key = ObjectIdentifier(channel)
        children.withLock { $0[key] = channel }
        channel.closeFuture.whenComplete { _ in
            _ = self.children.withLock { $0.removeValue(forKey: key) }
        }
    }

    // MARK: - Serving

    private typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>
    private typealias Iterator = NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator
    private typealias Writer = NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>

    private func serve(_ connection: Connection, id: Int) async {
        try? await connection.executeThenClose { inbound, outbound in
            var requests = inbound.makeAsyncIterator()
            while let part = try await requests.next() {
                guard case .head(let head) = part else { continue }
                received.add(1, ordering: .relaxed)
                if head.headers.contains(where: { $0.name.lowercased().hasPrefix("x-balancer-") }) {
                    balancerHeaders.add(1, ordering: .relaxed)
                }
                let keepGoing = try await respond(
                    to: head,
                    id: id,
                    connection: connection,
                    requests: &requests,
                    outbound: outbound
                )
                if !keepGoing { return }
            }
        }
    }

    /// Answers one request; returns false when the connection must close.
    private func respond(
        to head: HTTPRequestHead,
        id: Int,
        connection: Connection,
        requests: inout Iterator,
        outbound: Writer
    ) async throws -> Bool {
        let (path, query) = Self.split(head.uri)
        var headers = HTTPHeaders()
        headers.add(name: "x-connection-id", value: String(id))
        switch path {
        case "/echo":
            headers.add(name: "x-req-method", value: head.method.rawValue)
            headers.add(name: "x-req-uri", value: head.uri)
            for (name, value) in head.headers { headers.add(name: "x-req-\(name.lowercased())", value: value) }
            try await outbound.write(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)))
            while let part = try await requests.next() {
                switch part {
                case .body(let buffer): try await outbound.write(.body(.byteBuffer(buffer)))
                case .end:
                    try await outbound.write(.end(nil))
                    return true
                case .head: return false
                }
            }
            return false
        case "/bytes":
            try await Self.drain(&requests)
            let total = Int(query["n"] ?? "0") ?? 0
            headers.add(name: "content-length", value: String(total))
            try await outbound.write(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)))
            let chunk = ByteBuffer(repeating: UInt8(ascii: "x"), count: 64 * 1024)
            var remaining = total
            while remaining > 0 {
                let size = min(remaining, chunk.readableBytes)
                try await outbound.write(.body(.byteBuffer(chunk.getSlice(at: chunk.readerIndex, length: size)!)))
                written.add(size, ordering: .relaxed)
                remaining -= size
            }
            try await outbound.write(.end(nil))
            return true
        case "/chunked":
            try await Self.drain(&requests)
            let parts = Int(query["parts"] ?? "3") ?? 3
            try await outbound.write(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)))
            for index in 0..<parts {
                try await outbound.write(.body(.byteBuffer(ByteBuffer(string: "part-\(index);"))))
            }
            try await outbound.write(.end(["x-checksum": String(parts)]))
            return true
        case "/whole":
            try await Self.drain(&requests)
            let total = Int(query["n"] ?? "0") ?? 0
            headers.add(name: "content-length", value: String(total))
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)),
                .body(.byteBuffer(ByteBuffer(repeating: UInt8(ascii: "w"), count: total))), .end(nil),
            ])
            return true
        case "/pause":
            try await Self.drain(&requests)
            try await outbound.write(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)))
            try await outbound.write(.body(.byteBuffer(ByteBuffer(string: "first;"))))
            let deadline = ContinuousClock.now + .seconds(10)
            while !pausesReleased && connection.channel.isActive && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(5))
            }
            releasePauses()
            try await outbound.write(contentsOf: [.body(.byteBuffer(ByteBuffer(string: "second;"))), .end(nil)])
            return true
        case "/sink":
            // `?slow=1`: pause 1 ms every 32 pieces, slower than the client.
            let slow = query["slow"] == "1"
            var received = 0
            var pieces = 0
            loop: while let part = try await requests.next() {
                switch part {
                case .body(let buffer):
                    received += buffer.readableBytes
                    sinkReceived.add(buffer.readableBytes, ordering: .relaxed)
                    pieces += 1
                    if slow && pieces % 32 == 0 { try await Task.sleep(for: .milliseconds(1)) }
                case .end: break loop
                case .head: return false
                }
            }
            headers.add(name: "x-received-bytes", value: String(received))
            headers.add(name: "content-length", value: "0")
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)), .end(nil),
            ])
            return true
        case "/hang":
            try await Self.drain(&requests)
            while try await requests.next() != nil {}
            return false
        case "/hang-body":
            try await Self.drain(&requests)
            headers.add(name: "content-length", value: "100")
            try await outbound.write(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)))
            try await outbound.write(.body(.byteBuffer(ByteBuffer(repeating: 0x61, count: 10))))
            while try await requests.next() != nil {}
            return false
        case "/reset":
            try await Self.drain(&requests)
            try await Task.sleep(for: .milliseconds(Int(query["after_ms"] ?? "0") ?? 0))
            return false
        case "/truncate":
            try await Self.drain(&requests)
            headers.add(name: "content-length", value: "1000000")
            try await outbound.write(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)))
            try await outbound.write(.body(.byteBuffer(ByteBuffer(repeating: 0x61, count: 1000))))
            return false
        case "/close":
            try await Self.drain(&requests)
            headers.add(name: "connection", value: "close")
            headers.add(name: "content-length", value: "2")
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)),
                .body(.byteBuffer(ByteBuffer(string: "ok"))), .end(nil),
            ])
            return false
        case "/stall-upload":
            // Never reads the request body: the proxy's writes back up until it gives up.
            while connection.channel.isActive { try await Task.sleep(for: .milliseconds(50)) }
            return false
        case "/unsolicited":
            // Answers, then 300 ms later sends a 408 nobody asked for and keeps the
            // connection open (some servers announce their idle timeout this way).
            try await Self.drain(&requests)
            headers.add(name: "content-length", value: "0")
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)), .end(nil),
            ])
            try await Task.sleep(for: .milliseconds(300))
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .requestTimeout, headers: ["content-length": "0"])),
                .end(nil),
            ])
            return true
        case "/hop":
            try await Self.drain(&requests)
            headers.add(name: "connection", value: "x-backend-hop")
            headers.add(name: "x-backend-hop", value: "must not pass")
            headers.add(name: "keep-alive", value: "timeout=5")
            headers.add(name: "proxy-authenticate", value: "Basic realm=x")
            headers.add(name: "trailer", value: "x-never")
            headers.add(name: "upgrade", value: "h2c")
            headers.add(name: "via", value: "1.1 backend")
            headers.add(name: "x-end-to-end", value: "kept")
            headers.add(name: "content-length", value: "3")
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)),
                .body(.byteBuffer(ByteBuffer(string: "hop"))), .end(nil),
            ])
            return true
        case "/healthz":
            try await Self.drain(&requests)
            healthCount.add(1, ordering: .relaxed)
            headers.add(name: "content-length", value: "0")
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: isHealthy ? .ok : .serviceUnavailable, headers: headers)),
                .end(nil),
            ])
            return true
        case _ where path == "/delayed" || path.hasPrefix("/delayed/"):
            try await Self.drain(&requests)
            let deadline = ContinuousClock.now + responseDelay
            while connection.channel.isActive && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(5))
            }
            guard connection.channel.isActive else {
                delayedDisconnects.add(1, ordering: .relaxed)
                return false
            }
            // `?n=N`: N bytes of body instead of the port.
            let text = query["n"].flatMap { Int($0) }.map { String(repeating: "d", count: $0) } ?? "port \(port)"
            headers.add(name: "x-backend-port", value: String(port))
            headers.add(name: "content-length", value: String(text.utf8.count))
            // `?close=1`: the answer closes the connection.
            let close = query["close"] == "1"
            if close { headers.add(name: "connection", value: "close") }
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)),
                .body(.byteBuffer(ByteBuffer(string: text))), .end(nil),
            ])
            return !close
        default:
            try await Self.drain(&requests)
            let code = Int(query["code"] ?? "") ?? 404
            headers.add(name: "content-length", value: "0")
            try await outbound.write(contentsOf: [
                .head(HTTPResponseHead(version: .http1_1, status: .init(statusCode: code), headers: headers)),
                .end(nil),
            ])
            return true
        }
    }

    /// Reads the rest of the current request.
    private static func drain(_ requests: inout Iterator) async throws {
        while let part = try await requests.next() {
            if case .end = part { return }
        }
    }

    private static func split(_ uri: String) -> (path: String, query: [String: String]) {
        guard let mark = uri.firstIndex(of: "?") else { return (uri, [:]) }
        var query: [String: String] = [:]
        for pair in uri[uri.index(after: mark)...].split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            query[String(parts[0])] = parts.count > 1 ? String(parts[1]) : ""
        }
        return (String(uri[..<mark]), query)
    }
}

/// Connections accepted while the listener was closing never reach the accept
/// loop; a NIOAsyncChannel dropped without `executeThenClose` traps in debug
/// builds, so each one is held here until served or closed properly.
private final class Unserved: Sendable {
    private typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>
    private let connections = Mutex<[ObjectIdentifier: Connection]>([:])

    func add(_ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>) {
        connections.withLock { $0[ObjectIdentifier(connection.channel)] = connection }
    }

    func remove(_ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>) {
        _ = connections.withLock { $0.removeValue(forKey: ObjectIdentifier(connection.channel)) }
    }

    func closeAll() async {
        let left = connections.withLock { connections in
            defer { connections.removeAll() }
            return Array(connections.values)
        }
        for connection in left { try? await connection.executeThenClose { _, _ in } }
    }
}

/// Counts the bytes whose socket writes completed: what really left the backend process.
private final class SocketWriteCounter: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    final class Total: Sendable {
        private let bytes = Atomic<Int>(0)
        var value: Int { bytes.load(ordering: .relaxed) }
        func add(_ count: Int) { bytes.add(count, ordering: .relaxed) }
    }

    private let total: Total
    init(_ total: Total) { self.total = total }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let count = unwrapOutboundIn(data).readableBytes
        let promise = promise ?? context.eventLoop.makePromise()
        let total = self.total
        promise.futureResult.whenSuccess { total.add(count) }
        context.write(data, promise: promise)
    }
}

/// Answers the first bytes of a connection with a fixed text, then closes it.
private final class RawAnswerHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let answer: String
    private var answered = false

    init(answer: String) { self.answer = answer }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !answered else { return }
        answered = true
        let context = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.value.writeAndFlush(wrapOutboundOut(ByteBuffer(string: answer))).whenComplete { _ in
            context.value.close(promise: nil)
        }
    }
}

/// Answers whatever arrives with bytes that are not an HTTP response.
private final class GarbageHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let garbage = ByteBuffer(string: "SSH-2.0-definitely not http\r\n\r\n")
        context.writeAndFlush(wrapOutboundOut(garbage), promise: nil)
    }
}

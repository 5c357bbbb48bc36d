import BalancerCore
import BalancerServer
import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import Testing

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// A logger that drops everything: tests never bootstrap the global logging system.
let quietLogger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

/// A live in-process server on 127.0.0.1 and an ephemeral port, run in a
/// `ServiceGroup` the way `balancer serve` runs it.
struct TestServer: Sendable {
    let server: HTTPServer
    let group: ServiceGroup
    var port: Int { server.port }
    var balancer: Balancer { server.balancer }

    func url(_ path: String) -> URL { URL(string: "http://127.0.0.1:\(port)\(path)")! }
}

/// Runs `body` against a fresh server, then drains it gracefully and waits for it to stop.
///
/// - Parameters:
///   - accessLog: where the access log goes when `access_log` is on.
///   - logger: the upstream pools' logger.
func withServer<T: Sendable>(
    _ configure: (inout ServerConfiguration) -> Void = { _ in },
    accessLog: AccessLogSink? = nil,
    logger: Logger = quietLogger,
    _ body: (TestServer) async throws -> T
) async throws -> T {
    var configuration = ServerConfiguration()
    configuration.port = 0
    configuration.gracePeriodMilliseconds = 5_000
    configure(&configuration)
    let balancer = Balancer(configuration: configuration.balancer)
    let upstreams = try UpstreamPool.pools(of: configuration, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger)
    let server = try await HTTPServer.bind(
        configuration: configuration, balancer: balancer, upstreams: upstreams, accessLog: accessLog, logger: quietLogger)
    let grace = Duration.milliseconds(configuration.gracePeriodMilliseconds)
    let group = ServiceGroup(
        configuration: .init(services: server.services(gracePeriod: grace), logger: quietLogger)
    )
    let running = Task { try await group.run() }
    let testServer = TestServer(server: server, group: group)
    do {
        let result = try await body(testServer)
        await group.triggerGracefulShutdown()
        try await running.value
        return result
    } catch {
        await group.triggerGracefulShutdown()
        _ = try? await running.value
        throw error
    }
}

// MARK: - A real HTTP client: URLSession (libcurl underneath on Linux)

struct HTTPResult: Sendable {
    var status: Int
    var headers: [String: String]
    var body: Data

    var text: String { String(decoding: body, as: UTF8.self) }

    /// The body as a JSON object, parsed by Foundation (independent of the server's own JSON code).
    var json: [String: any Sendable] {
        get throws {
            let object = try JSONSerialization.jsonObject(with: body)
            return try #require(object as? [String: any Sendable], "not a JSON object: \(text)")
        }
    }

    /// `error` of an error body.
    var errorCode: String? { (try? json)?["error"] as? String }

    func header(_ name: String) -> String? {
        headers.first { $0.key.lowercased() == name.lowercased() }?.value
    }
}

let testSession: URLSession = {
    let configuration = URLSessionConfiguration.ephemeral
    configuration.timeoutIntervalForRequest = 20
    configuration.httpMaximumConnectionsPerHost = 128
    return URLSession(configuration: configuration)
}()

func request(
    _ url: URL,
    method: String = "GET",
    body: String? = nil,
    headers: [String: String] = [:],
    session: URLSession = testSession
) async throws -> HTTPResult {
    var request = URLRequest(url: url)
    request.httpMethod = method
    if let body {
        request.httpBody = Data(body.utf8)
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
    }
    for (name, value) in headers { request.setValue(value, forHTTPHeaderField: name) }
    let (data, response) = try await session.data(for: request)
    let http = try #require(response as? HTTPURLResponse)
    var fields: [String: String] = [:]
    for (key, value) in http.allHeaderFields {
        if let key = key as? String, let value = value as? String { fields[key] = value }
    }
    return HTTPResult(status: http.statusCode, headers: fields, body: data)
}

func postJob(_ server: TestServer, _ body: String) async throws -> HTTPResult {
    try await request(server.url("/jobs"), method: "POST", body: body)
}

/// `/stats` `connections.send_timeouts`: connections closed because their
/// client took nothing for `send_timeout_ms`.
func sendTimeouts(_ server: TestServer) async throws -> Int? {
    let connections = try await request(server.url("/stats")).json["connections"] as? [String: any Sendable]
    return connections?["send_timeouts"] as? Int
}

// MARK: - A raw TCP client, for what an HTTP client will not send

/// One TCP connection, driven byte by byte: slow heads, pipelining, bad syntax.
final class RawConnection {
    private var inbound: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    private var received = ByteBuffer()

    fileprivate init(
        inbound: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator,
        outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    ) {
        self.inbound = inbound
        self.outbound = outbound
    }

    func send(_ text: String) async throws {
        try await outbound.write(ByteBuffer(string: text))
    }

    func send(_ buffer: ByteBuffer) async throws {
        try await outbound.write(buffer)
    }

    /// Sends `POST /jobs` with `job` as its body.
    func postJob(_ job: String) async throws {
        try await send("POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \(job.utf8.count)\r\n\r\n\(job)")
    }

    /// Reads one response (status, headers, Content-Length body); nil if the connection closed first.
    func readResponse() async throws -> RawResponse? {
        while true {
            if let response = parseResponse() { return response }
            guard var chunk = try await inbound.next() else { return nil }
            received.writeBuffer(&chunk)
        }
    }

    /// Reads and drops bytes until at least `count` have arrived (counting what
    /// was already received) or the connection closed; returns how many arrived.
    func discard(_ count: Int) async throws -> Int {
        var arrived = received.readableBytes
        received.clear()
        while arrived < count, let chunk = try await inbound.next() { arrived += chunk.readableBytes }
        return arrived
    }

    /// Reads until `text` has arrived and returns everything read up to its end
    /// (what follows stays for the next read); nil if the connection closed first.
    func read(through text: String) async throws -> String? {
        while true {
            let view = received.readableBytesView
            if let range = view.firstRange(of: Array(text.utf8)) {
                return received.readString(length: range.upperBound - view.startIndex)
            }
            guard var chunk = try await inbound.next() else { return nil }
            received.writeBuffer(&chunk)
        }
    }

    /// Reads until the server closes; true if it did (false if it sent more bytes instead).
    func readUntilClosed() async throws -> Bool {
        while let chunk = try await inbound.next() {
            if chunk.readableBytes > 0 { return false }
        }
        return true
    }

    private func parseResponse() -> RawResponse? {
        let view = received.readableBytesView
        guard let end = view.firstRange(of: Array("\r\n\r\n".utf8)) else { return nil }
        let headText = String(decoding: view[view.startIndex..<end.lowerBound], as: UTF8.self)
        var lines = headText.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst()
        let status = Int(statusLine.split(separator: " ")[1]) ?? 0
        var headers: [String: String] = [:]
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let length = Int(headers["content-length"] ?? "0") ?? 0
        let headLength = end.upperBound - view.startIndex
        guard received.readableBytes >= headLength + length else { return nil }
        received.moveReaderIndex(forwardBy: headLength)
        let body = received.readString(length: length) ?? ""
        return RawResponse(status: status, headers: headers, body: body)
    }
}

struct RawResponse: Sendable {
    var status: Int
    /// Lower-cased names.
    var headers: [String: String]
    var body: String

    var errorCode: String? {
        guard let object = try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] else { return nil }
        return object["error"] as? String
    }
}

/// `receiveBuffer` sets the socket's receive buffer (and so the TCP window) in
/// bytes, for a client that stops reading and must back the server up soon.
func withRawConnection<T: Sendable>(
    port: Int,
    receiveBuffer: Int? = nil,
    _ body: (RawConnection) async throws -> T
) async throws -> T {
    var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
    if let receiveBuffer { bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: SocketOptionValue(receiveBuffer)) }
    let channel = try await bootstrap
        .connect(host: "127.0.0.1", port: port) { channel in
            channel.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
            }
        }
    return try await channel.executeThenClose { inbound, outbound in
        try await body(RawConnection(inbound: inbound.makeAsyncIterator(), outbound: outbound))
    }
}

/// Runs `body` while a sleep job of `milliseconds` (the default `max_job_ms`)
/// runs or waits on the server: far longer than any assertion takes on a
/// loaded machine, so the job cannot end under the test's feet. It is sent on
/// its own connection, which is closed when `body` returns: that cancels the
/// job, so the test does not wait it out. Wait for the job to reach a worker
/// (or the backlog) inside `body`, in whatever terms the test needs.
func whileAJobRuns<T: Sendable>(
    _ server: TestServer,
    milliseconds: Int = 10_000,
    _ body: () async throws -> T
) async throws -> T {
    try await withRawConnection(port: server.port) { connection in
        try await connection.postJob(#"{"op":"sleep","ms":\#(milliseconds)}"#)
        return try await body()
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes. The
/// default is generous: it is only reached when the test fails, and a loaded
/// 2-core CI machine can take seconds to reach a state a quiet one reaches at once.
func eventually(
    timeout: Duration = .seconds(20),
    _ condition: () async throws -> Bool
) async throws -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try await Task.sleep(for: .milliseconds(20))
    }
    return try await condition()
}

/// Keeps every line logged through ``logger``, for tests that check what an
/// operator would read.
final class LogRecorder: Sendable {
    struct Line: Sendable {
        let level: Logger.Level
        let message: String
        let metadata: [String: String]
    }

    private let lines = Mutex<[Line]>([])
    var all: [Line] { lines.withLock { $0 } }

    var logger: Logger { Logger(label: "test") { _ in Handler(recorder: self) } }

    private struct Handler: LogHandler {
        let recorder: LogRecorder
        var metadata: Logger.Metadata = [:]
        var metadataProvider: Logger.MetadataProvider?
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            let merged = metadata.merging(event.metadata ?? [:]) { $1 }
            let line = Line(level: event.level, message: event.message.description, metadata: merged.mapValues { "\($0)" })
            recorder.lines.withLock { $0.append(line) }
        }
    }
}

import BalancerServer
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

@Suite("UpstreamBodyStreamTests")
struct UpstreamBodyStreamTests {
    @Test func writesWaitWhileTheConsumerIsBehind() async throws {
        let stream = RequestBodyStream(maxBufferedBytes: 150_000)
        let written = Atomic<Int>(0)
        let producer = Task {
            for _ in 0..<3 {
                try await stream.write(ByteBuffer(repeating: 1, count: 100_000))
                written.add(1, ordering: .relaxed)
            }
            stream.finish()
        }
        try await Task.sleep(for: .milliseconds(200))
        // The second write took the stream over its limit: it waits for the consumer.
        #expect(written.load(ordering: .relaxed) == 1)
        var iterator = stream.makeAsyncIterator()
        var total = 0
        while let buffer = try await iterator.next() { total += buffer.readableBytes }
        #expect(total == 300_000)
        try await producer.value
        #expect(written.load(ordering: .relaxed) == 3)
    }

    @Test func producerLearnsThatTheConsumerIsGone() async throws {
        let stream = RequestBodyStream(maxBufferedBytes: 10)
        let producer = Task { () -> (any Error)? in
            do {
                while true { try await stream.write(ByteBuffer(string: "more than ten bytes")) }
            } catch {
                return error
            }
        }
        try await Task.sleep(for: .milliseconds(100))
        stream.cancel()
        let error = await producer.value
        #expect(error is RequestBodyStream.Gone)
    }

    @Test func consumerGetsTheProducersErrorAndCancellationEndsIt() async throws {
        struct Broken: Error {}
        let failing = RequestBodyStream()
        try await failing.write(ByteBuffer(string: "a"))
        failing.finish(throwing: Broken())
        var iterator = failing.makeAsyncIterator()
        #expect(try await iterator.next() == ByteBuffer(string: "a"))
        await #expect(throws: Broken.self) { _ = try await iterator.next() }

        let waiting = RequestBodyStream()
        let consumer = Task { () -> (any Error)? in
            var iterator = waiting.makeAsyncIterator()
            do {
                _ = try await iterator.next()
                return nil
            } catch {
                return error
            }
        }
        try await Task.sleep(for: .milliseconds(50))
        consumer.cancel()
        #expect(await consumer.value is CancellationError)
        await #expect(throws: RequestBodyStream.Gone.self) { try await waiting.write(ByteBuffer(string: "late")) }
    }

    /// The integration the server does: a proxy built from the pieces (the
    /// connection task pumps the client's body into a RequestBodyStream, a
    /// separate "worker" task forwards, the response goes out through a
    /// writer onto the client's NIOAsyncChannel), driven by an UpstreamConnection as the client.
    @Test func largeUploadAndEchoPassThroughAProxyMadeOfThePieces() async throws {
        try await withUpstreamBackend { backend in
            let proxy = try await MiniUpstreamProxy.start(
                to: try Backend(name: "echo", url: "http://127.0.0.1:\(backend.port)")
            )
            let client = UpstreamConnection(backend: try Backend(name: "proxy", url: "http://127.0.0.1:\(proxy.port)"))
            let total = 50 * 1024 * 1024
            let writer = CountingResponseWriter()
            let before = residentMemoryBytes()
            let result = try await client.forward(
                upstreamTestRequest(.POST, "/echo", headers: [("Content-Length", String(total))]),
                body: GeneratedBody(total: total, peakResident: .init()),
                forwarding: ForwardedFor(clientAddress: "198.51.100.1"),
                to: writer
            )
            let figures = writer.figures
            #expect(result.status == .ok)
            #expect(figures.bytes == total)
            #expect(figures.head?.headers["via"] == ["1.1 swift-balancer, 1.1 swift-balancer"])
            #expect(figures.head?.headers["x-req-x-forwarded-for"] == ["198.51.100.1, 127.0.0.1"])
            let growth = max(figures.peakResidentBytes - before, 0)
            #expect(growth < 64 * 1024 * 1024, "resident memory grew by \(growth) bytes")

            // The backend is gone: the proxy answers 502 itself, naming it.
            await backend.stop()
            let failed = CollectingResponseWriter()
            let answer = try await client.forward(
                upstreamTestRequest("/echo"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: failed
            )
            #expect(answer.status == .badGateway)
            #expect(failed.bodyString.contains("echo"))
            await client.close()
            await proxy.stop()
        }
    }
}

/// Writes a proxied response to the client's NIOAsyncChannel writer; each write
/// waits while the client's socket is full.
struct MiniProxyResponseWriter: ProxyResponseWriter {
    let outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    private let wroteHead = HeadFlag()

    init(outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>) { self.outbound = outbound }

    /// Whether an error status can no longer be sent.
    var headWritten: Bool { wroteHead.value }

    func writeHead(_ head: HTTPResponseHead) async throws {
        wroteHead.set()
        try await outbound.write(.head(head))
    }

    func writeBody(_ buffer: ByteBuffer) async throws { try await outbound.write(.body(.byteBuffer(buffer))) }

    func end(trailers: HTTPHeaders?) async throws { try await outbound.write(.end(trailers)) }

    private final class HeadFlag: Sendable {
        private let flag = Atomic<Bool>(false)
        var value: Bool { flag.load(ordering: .acquiring) }
        func set() { flag.store(true, ordering: .releasing) }
    }
}

/// A proxy assembled the way the server is expected to use the upstream pieces.
final class MiniUpstreamProxy: Sendable {
    let port: Int
    private let channel: any Channel
    private let running: Task<Void, Never>

    private init(port: Int, channel: any Channel, running: Task<Void, Never>) {
        self.port = port
        self.channel = channel
        self.running = running
    }

    static func start(to backend: Backend, port: Int = 0) async throws -> MiniUpstreamProxy {
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .bind(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    return try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(
                        wrappingChannelSynchronously: channel
                    )
                }
            }
        let running = Task {
            _ = try? await server.executeThenClose { inbound in
                await withDiscardingTaskGroup { group in
                    do {
                        for try await connection in inbound {
                            group.addTask { await serve(connection, backend: backend) }
                        }
                    } catch {}
                }
            }
        }
        return MiniUpstreamProxy(port: server.channel.localAddress!.port!, channel: server.channel, running: running)
    }

    func stop() async {
        try? await channel.close()
        await running.value
    }

    private static func serve(
        _ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>,
        backend: Backend
    ) async {
        let remote = connection.channel.remoteAddress
        // One worker connection per client connection keeps the test small; the
        // server will pick `connections[workerID]` instead.
        let upstream = UpstreamConnection(backend: backend)
        try? await connection.executeThenClose { inbound, outbound in
            var requests = inbound.makeAsyncIterator()
            while let part = try await requests.next() {
                guard case .head(let head) = part else { continue }
                let body = RequestBodyStream()
                let writer = MiniProxyResponseWriter(outbound: outbound)
                let worker = Task {
                    try await upstream.forward(head, body: body, forwarding: ForwardedFor(client: remote), to: writer)
                }
                pump: while let part = try await requests.next() {
                    switch part {
                    case .body(let buffer): try? await body.write(buffer)  // Gone: keep reading to the end
                    case .end:
                        body.finish()
                        break pump
                    case .head: return
                    }
                }
                do {
                    _ = try await worker.value
                } catch let error as UpstreamError {
                    guard !writer.headWritten, let status = error.kind.suggestedStatus else { return }
                    let message = ByteBuffer(
                        string: #"{"error":"\#(error.kind.rawValue)","backend":"\#(error.backend)"}"#
                    )
                    try await outbound.write(contentsOf: [
                        .head(
                            HTTPResponseHead(
                                version: .http1_1,
                                status: status,
                                headers: ["content-length": String(message.readableBytes)]
                            )
                        ),
                        .body(.byteBuffer(message)), .end(nil),
                    ])
                }
            }
        }
        await upstream.close()
    }
}

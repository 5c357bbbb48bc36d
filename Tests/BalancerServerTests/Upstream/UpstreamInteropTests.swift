import BalancerServer
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing

/// Whether `python3` can be started (it is on the CI image; skipped where it is not).
let upstreamPythonAvailable: Bool = {
    FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")
        || (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").contains {
            FileManager.default.isExecutableFile(atPath: "\($0)/python3")
        }
}()

@Suite("UpstreamInteropTests")
struct UpstreamInteropTests {
    @Test func headRequestGetsNoBodyAndKeepsTheConnection() async throws {
        try await withUpstreamBackend { backend in
            let connection = try makeUpstreamConnection(to: backend)
            let writer = CollectingResponseWriter()
            let result = try await connection.forward(
                upstreamTestRequest(.HEAD, "/bytes?n=1000"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: writer
            )
            #expect(result.status == .ok && result.responseBodyBytes == 0 && result.keptAlive)
            #expect(writer.head?.headers["content-length"] == ["1000"])
            #expect(writer.response.ended)
            let next = try await connection.forward(
                upstreamTestRequest("/bytes?n=5"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: CollectingResponseWriter()
            )
            #expect(next.reusedConnection && next.responseBodyBytes == 5)
        }
    }

    @Test func keptConnectionClosedByTheBackendWhileIdleIsReplacedTransparently() async throws {
        try await withUpstreamBackend { backend in
            let connection = try makeUpstreamConnection(to: backend)
            _ = try await connection.forward(
                upstreamTestRequest("/echo"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: CollectingResponseWriter()
            )
            await backend.closeClientConnections()
            try await Task.sleep(for: .milliseconds(100))
            let result = try await connection.forward(
                upstreamTestRequest("/echo"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: CollectingResponseWriter()
            )
            #expect(result.status == .ok)
            #expect(result.reusedConnection == false)
            #expect(backend.connectionsAccepted == 2)
        }
    }

    @Test func unsolicitedResponseOnAnIdleConnectionIsNeverTakenForTheNextAnswer() async throws {
        try await withUpstreamBackend { backend in
            let connection = try makeUpstreamConnection(to: backend)
            let first = try await connection.forward(
                upstreamTestRequest("/unsolicited"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: CollectingResponseWriter()
            )
            #expect(first.status == .ok)
            // 300 ms later the backend sends a 408 nobody asked for; the idle
            // connection that receives it is closed, not kept for the next request.
            #expect(try await eventually { backend.openConnections == 0 }, "the proxy closed the connection")
            let writer = CollectingResponseWriter()
            let second = try await connection.forward(
                upstreamTestRequest("/echo"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: writer
            )
            #expect(second.status == .ok)
            #expect(second.reusedConnection == false)
            #expect(writer.head?.headers["x-req-method"] == ["GET"])
        }
    }

    /// Python's `http.server`: an HTTP/1.0 server that closes after each response.
    @Test(.enabled(if: upstreamPythonAvailable))
    func forwardsToPythonHTTPServer() async throws {
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("upstream-python-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        try Data("hello from python\n".utf8).write(to: directory.appendingPathComponent("hello.txt"))

        // A port that was free a moment ago; python binds it, we poll until it answers.
        let probe = try await UpstreamTestBackend.start()
        let port = probe.port
        await probe.stop()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [
            "python3", "-m", "http.server", String(port), "--bind", "127.0.0.1", "--directory", directory.path,
        ]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer {
            // SIGKILL: the child may inherit a mask that blocks SIGTERM from the test process.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        var answering = false
        for _ in 0..<100 where !answering {
            let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            if let channel = try? await bootstrap.connect(host: "127.0.0.1", port: port).get() {
                try? await channel.close()
                answering = true
            } else {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        try #require(answering, "python3 -m http.server did not start")

        let connection = UpstreamConnection(backend: try Backend(name: "python", url: "http://127.0.0.1:\(port)"))
        for _ in 0..<2 {
            let writer = CollectingResponseWriter()
            let result = try await connection.forward(
                upstreamTestRequest("/hello.txt"),
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: "192.0.2.7"),
                to: writer
            )
            #expect(result.status == .ok)
            #expect(writer.bodyString == "hello from python\n")
            #expect(result.keptAlive == false)  // HTTP/1.0 without keep-alive
            #expect(writer.head?.headers["via"] == ["1.0 swift-balancer"])
        }
        #expect(connection.connectionsOpened == 2)
        let missing = CollectingResponseWriter()
        let notFound = try await connection.forward(
            upstreamTestRequest("/missing"),
            body: EmptyBody(),
            forwarding: ForwardedFor(clientAddress: nil),
            to: missing
        )
        #expect(notFound.status == .notFound && notFound.statusClass == 4)
    }
}

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

        // Python's http.server on a port the kernel picks (a port probed free a
        // moment before may be taken by a parallel test meanwhile); it writes
        // the port to a file once its socket listens.
        let portFile = directory.appendingPathComponent("port")
        let script = """
            import functools, http.server, os, sys
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
            server = http.server.HTTPServer(("127.0.0.1", 0), handler)
            with open(sys.argv[2] + ".tmp", "w") as f: f.write(str(server.server_address[1]))
            os.rename(sys.argv[2] + ".tmp", sys.argv[2])
            server.serve_forever()
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", script, directory.path, portFile.path]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer {
            // SIGKILL: the child may inherit a mask that blocks SIGTERM from the test process.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        var port: Int?
        for _ in 0..<200 where port == nil {
            port = (try? String(contentsOf: portFile, encoding: .utf8)).flatMap { Int($0) }
            if port == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        let pythonPort = try #require(port, "python's http.server did not start")

        let connection = UpstreamConnection(backend: try Backend(name: "python", url: "http://127.0.0.1:\(pythonPort)"))
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

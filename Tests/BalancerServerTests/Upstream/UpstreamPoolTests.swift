import BalancerCore
import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Testing

@testable import BalancerServer

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Runs `body` against a server whose upstream pool is `backends` (4
/// connections each), run the way `balancer serve --upstream ...` runs it.
func withProxy<T: Sendable>(
    _ backends: [Int],
    _ configure: (inout ServerConfiguration) -> Void = { _ in },
    logger: Logger = quietLogger,
    _ body: (TestServer, UpstreamPool) async throws -> T
) async throws -> T {
    try await withServer({ configuration in
        configuration.upstreams = backends.map { "http://127.0.0.1:\($0)" }
        configuration.connectionsPerUpstream = 4
        configure(&configuration)
    }, logger: logger) { server in
        try await body(server, try #require(server.server.upstreams.first))
    }
}

@Suite("upstream pools through the server: proxying, retries, failures")
struct UpstreamPoolTests {
    @Test("headers and bodies go through; hop-by-hop headers are stripped; X-Forwarded-* and Via are added")
    func roundTrip() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            let echoed = try await request(
                server.url("/echo?q=1"), method: "POST", body: "{\"hello\":\"backend\"}",
                headers: ["X-Custom": "yes", "Connection": "x-drop-me", "X-Drop-Me": "secret"])
            #expect(echoed.status == 200)
            #expect(echoed.text == "{\"hello\":\"backend\"}")
            #expect(echoed.header("x-req-x-custom") == "yes")
            #expect(echoed.header("x-req-x-drop-me") == nil, "headers named in Connection are hop-by-hop")
            #expect(echoed.header("x-req-uri") == "/echo?q=1")
            #expect(echoed.header("x-req-x-forwarded-for") == "127.0.0.1")
            #expect(echoed.header("x-req-x-forwarded-proto") == "http")
            #expect(echoed.header("x-req-x-forwarded-host") == "127.0.0.1:\(server.port)")
            #expect(echoed.header("x-req-via")?.contains("swift-balancer") == true)

            let hop = try await request(server.url("/hop"))
            #expect(hop.status == 200)
            #expect(hop.text == "hop")
            #expect(hop.header("x-backend-hop") == nil)
            #expect(hop.header("keep-alive") == nil)
            #expect(hop.header("proxy-authenticate") == nil)
            #expect(hop.header("x-end-to-end") == "kept")
            #expect(hop.header("via")?.contains("swift-balancer") == true)

            let chunked = try await request(server.url("/chunked?parts=5"))
            #expect(chunked.text == "part-0;part-1;part-2;part-3;part-4;", "trailers are dropped for a client that did not ask")
            // A client that asks for trailers gets the backend's, over chunked framing.
            let raw = try await curl(["--raw", "-H", "TE: trailers", server.url("/chunked?parts=2").absoluteString])
            #expect(raw.contains("7\r\npart-0;\r\n7\r\npart-1;\r\n0\r\nx-checksum: 2\r\n\r\n"), "\(raw.debugDescription)")

            // The server's own paths stay the server's.
            let stats = try await request(server.url("/stats"))
            let upstream = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first)
            let workers = try #require(upstream["workers"] as? [[String: any Sendable]])
            #expect(workers.count == 4)
            #expect(workers.reduce(0) { $0 + ($1["requests"] as? Int ?? 0) } == 4)
        }
    }

    @Test("a large body streams through both ways (memory bounds are UpstreamConnectionTests')")
    func largeBodies() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            let size = 8 << 20
            var upload = URLRequest(url: server.url("/sink"))
            upload.httpMethod = "POST"
            let (_, response) = try await testSession.upload(for: upload, from: Data(repeating: 0x62, count: size))
            let http = try #require(response as? HTTPURLResponse)
            #expect(http.statusCode == 200)
            #expect(http.value(forHTTPHeaderField: "x-received-bytes") == String(size))

            let download = try await request(server.url("/bytes?n=\(size)"))
            #expect(download.status == 200)
            #expect(download.body.count == size)
        }
    }

    @Test("a backend killed mid-run: idempotent requests all succeed through retries")
    func backendKilledMidRun() async throws {
        let first = try await UpstreamTestBackend.start()
        let second = try await UpstreamTestBackend.start()
        defer { Task { await first.stop() } }
        try await withProxy([first.port, second.port]) { server, upstream in
            let statuses = try await withThrowingTaskGroup(of: [Int].self) { group in
                for _ in 0..<8 {
                    group.addTask {
                        var statuses: [Int] = []
                        for _ in 0..<40 {
                            statuses.append(try await request(server.url("/echo")).status)
                        }
                        return statuses
                    }
                }
                try await Task.sleep(for: .milliseconds(30))
                await second.stop()
                return try await group.reduce([], +)
            }
            #expect(statuses.count == 320)
            #expect(statuses.allSatisfy { $0 == 200 }, "statuses other than 200: \(statuses.filter { $0 != 200 })")
            let stats = try await request(server.url("/stats"))
            let pool = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first)
            let backends = try #require(pool["backends"] as? [[String: any Sendable]])
            #expect((backends[1]["ejections"] as? Int ?? 0) >= 1, "the dead backend was ejected: \(backends)")
            _ = upstream
        }
    }

    @Test("a backend leaving the rotation is logged as a warning with the reason, its return as info")
    func rotationChangesAreLogged() async throws {
        let alive = try await UpstreamTestBackend.start()
        let broken = try await UpstreamTestBackend.start(mode: .garbage)
        defer { Task { await alive.stop(); await broken.stop() } }
        let log = LogRecorder()
        try await withProxy([alive.port, broken.port], { $0.upstreamFailTimeoutMilliseconds = 300 }, logger: log.logger) {
            server, _ in
            // Requests until one meets the broken backend: garbage, a 502, backend2 ejected.
            var statuses: [Int] = []
            let ejected = try await eventually {
                statuses.append(try await request(server.url("/echo")).status)
                return log.all.contains { $0.message == "backend out of rotation" }
            }
            #expect(ejected)
            // An invalid response is never tried again (the backend may have acted on the request).
            #expect(statuses.contains(502) && statuses.allSatisfy { [200, 502].contains($0) }, "\(statuses)")
            let out = try #require(log.all.first { $0.message == "backend out of rotation" })
            #expect(out.level == .warning)
            #expect(out.metadata["pool"] == "upstream")
            #expect(out.metadata["backend"] == "backend2")
            #expect(out.metadata["url"] == "http://127.0.0.1:\(broken.port)")
            let reason = out.metadata["reason"] ?? ""
            #expect(reason.contains("ejected") && reason.contains("invalid_response"), "reason: \(reason)")
            // The cool-down ends: back in rotation, logged once.
            #expect(try await eventually { log.all.contains { $0.message == "backend in rotation" } })
            let back = log.all.filter { $0.message == "backend in rotation" }
            #expect(back.count == 1)
            #expect(back.first?.level == .info)
            #expect(back.first?.metadata["backend"] == "backend2")
            #expect(!log.all.contains { $0.metadata["backend"] == "backend1" }, "backend1 never left")
        }
    }

    @Test("a backend that hangs gives 504 within the response timeout, naming it")
    func hangingBackend() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port], { $0.upstreamResponseTimeoutMilliseconds = 300 }) { server, _ in
            let start = ContinuousClock.now
            let result = try await request(server.url("/hang"))
            #expect(result.status == 504)
            #expect(result.errorCode == "response_timeout")
            #expect(result.text.contains("backend1"))
            #expect(result.text.contains("not tried again"), "a response timeout is never retried: \(result.text)")
            #expect(ContinuousClock.now - start < .seconds(5))
        }
    }

    @Test("a backend that answers garbage gives 502")
    func garbageBackend() async throws {
        let backend = try await UpstreamTestBackend.start(mode: .garbage)
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port], { $0.upstreamRetries = 0 }) { server, _ in
            let result = try await request(server.url("/anything"))
            #expect(result.status == 502)
            #expect(result.errorCode == "invalid_response")
            #expect(result.text.contains("backend1"))
        }
    }

    @Test("all backends down gives 503 with Retry-After")
    func allBackendsDown() async throws {
        // Ports nobody listens on: start backends, note their ports, stop them.
        let a = try await UpstreamTestBackend.start()
        let b = try await UpstreamTestBackend.start()
        let ports = [a.port, b.port]
        await a.stop()
        await b.stop()
        try await withProxy(ports) { server, _ in
            for _ in 0..<3 {
                let result = try await request(server.url("/"))
                #expect(result.status == 503)
                #expect(result.header("retry-after") != nil)
                #expect(["no_healthy_backend", "unavailable"].contains(result.errorCode ?? ""), "\(result.text)")
            }
            let stats = try await request(server.url("/stats"))
            let pool = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first)
            let workers = try #require(pool["workers"] as? [[String: any Sendable]])
            #expect(workers.allSatisfy { $0["state"] as? String == "down" })
        }
    }

    @Test("an idle connection to a backend that has a request in flight comes after those of an idle backend")
    func idleConnectionsOfTheLeastBusyBackendFirst() async throws {
        let busy = try await UpstreamTestBackend.start()
        let idle = try await UpstreamTestBackend.start()
        defer { Task { await busy.stop(); await idle.stop() } }
        try await withProxy([busy.port, idle.port], { $0.connectionsPerUpstream = 3 }) { server, upstream in
            // The first request goes to backend1's first connection and stays there.
            async let paused = request(server.url("/pause"))
            #expect(try await eventually { busy.requestsReceived == 1 })
            // Backend1 still has two idle connections, but one request in flight:
            // every further request goes to backend2 (HAProxy's leastconn), while
            // the connections' own counts (0 each) cannot tell the backends apart.
            for n in 1...6 {
                let response = try await request(server.url("/hop"))
                #expect(response.status == 200)
                // The worker reports done just after the answer; the next request waits for it.
                #expect(try await eventually { await upstream.balancer.stats().completed == n })
            }
            #expect(busy.requestsReceived == 1, "backend1 took \(busy.requestsReceived - 1) requests beside the paused one")
            #expect(idle.requestsReceived == 6)
            busy.releasePauses()
            #expect(try await paused.status == 200)
        }
    }

    @Test("a slow client holds a fast backend back: the proxy does not buffer the response")
    func slowClientHoldsTheBackendBack() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            let total = 256 * 1024 * 1024
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("GET /bytes?n=\(total) HTTP/1.1\r\nHost: x\r\n\r\n")
                var arrived = try await connection.discard(1024 * 1024)
                try await Task.sleep(for: .seconds(2))  // the client reads nothing meanwhile
                // Without backpressure the backend would have sent (nearly) all of it by now;
                // with it, what it ran ahead sits in the kernel's buffers of the two hops
                // (autotuned, up to 32 MB a socket here) and a few pieces in the proxy.
                let ahead = backend.bytesWrittenToSockets - arrived
                #expect(ahead < 96 * 1024 * 1024, "the backend ran \(ahead) bytes ahead of the client")
                print("256 MB response to a paused client: backend \(ahead / 1024) KiB ahead")
                arrived += try await connection.discard(total - arrived)
                #expect(arrived >= total, "the whole response arrived")
            }
        }
    }
}


import NIOCore
import Testing

@testable import BalancerServer

/// How the proxy writes a backend's response to the client: as the backend
/// sends it, never more than it can answer for, and never faster than the
/// client reads (``ClientResponseWriter``).
@Suite("proxied responses stream: what the client sees while the backend sends, stalls or fails")
struct ProxyStreamingTests {
    @Test("a backend that sends a head and a first chunk, then pauses: the client has both before the pause ends")
    func streamsWhatHasArrived() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("GET /pause HTTP/1.1\r\nHost: x\r\n\r\n")
                let first = try #require(try await connection.read(through: "first;\r\n"))
                #expect(!backend.pausesReleased, "the first chunk reached the client only after the backend went on")
                #expect(first.hasPrefix("HTTP/1.1 200 OK\r\n"))
                #expect(first.hasSuffix("\r\n\r\n6\r\nfirst;\r\n"), "\(first.debugDescription)")
                backend.releasePauses()
                let rest = try #require(try await connection.read(through: "0\r\n\r\n"))
                #expect(rest == "7\r\nsecond;\r\n0\r\n\r\n")
            }
        }
    }

    @Test("a backend that dies after its head: the client gets that head, then the connection closes; 2xx is recorded")
    func headThenClose() async throws {
        let backend = try await UpstreamTestBackend.start(mode: .raw("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"))
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, upstream in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
                let head = try #require(try await connection.read(through: "\r\n\r\n"))
                #expect(head.hasPrefix("HTTP/1.1 200 OK\r\n"))
                #expect(head.lowercased().contains("content-length: 100\r\n"))
                #expect(try await connection.readUntilClosed(), "nothing more arrives: the connection closes")
            }
            let pool = upstream.poolName.rawValue
            #expect(
                try await eventually {
                    let text = try await request(server.url("/metrics")).text
                    return prometheusSample(text, #"balancer_requests_total{pool="\#(pool)",class="2xx"}"#) == 1
                })
            let text = try await request(server.url("/metrics")).text
            #expect(prometheusSample(text, #"balancer_requests_total{pool="\#(pool)",class="5xx"}"#) ?? 0 == 0)
        }
    }

    @Test("a backend whose body breaks in the read that brought its head: the client gets a 502 JSON, and 5xx is recorded")
    func brokenBeforeTheHeadWentOut() async throws {
        // "zz" is not a chunk size: the decoder fails right after the head, in the same read.
        let backend = try await UpstreamTestBackend.start(
            mode: .raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"))
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, upstream in
            let response = try await request(server.url("/anything"))
            #expect(response.status == 502)
            #expect(response.errorCode == "response_truncated")
            // A truncated response is never tried again, and the message says so.
            let message = try #require(try response.json["message"] as? String)
            #expect(message.hasPrefix("backend "), "\(message)")
            #expect(message.hasSuffix("; not tried again: the backend may have acted on the request"), "\(message)")
            #expect(response.header("content-type") == "application/json")
            let pool = upstream.poolName.rawValue
            #expect(
                try await eventually {
                    let text = try await request(server.url("/metrics")).text
                    return prometheusSample(text, #"balancer_requests_total{pool="\#(pool)",class="5xx"}"#) == 1
                })
            let text = try await request(server.url("/metrics")).text
            #expect(prometheusSample(text, #"balancer_requests_total{pool="\#(pool)",class="2xx"}"#) ?? 0 == 0)
        }
    }

    @Test("a client that takes none of a large proxied response is disconnected after send_timeout_ms; the forward ends")
    func sendTimeout() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        // One worker: the stalled forward holds it until the send timeout frees it.
        try await withProxy([backend.port], { $0.connectionsPerUpstream = 1; $0.sendTimeoutMilliseconds = 500 }) { server, upstream in
            let total = 256 * 1024 * 1024
            try await withRawConnection(port: server.port, receiveBuffer: 4_096) { stalled in
                try await stalled.send("GET /bytes?n=\(total) HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try await eventually { await upstream.balancer.stats().workers[0].pending == 1 })
                // The server's own answers go on meanwhile.
                #expect(try await request(server.url("/healthz")).status == 200)
                #expect(try await eventually { try await sendTimeouts(server) == 1 }, "the stalled connection is closed and counted")
                #expect(try await eventually { await upstream.balancer.stats().workers[0].pending == 0 }, "the forward ended")
                let arrived = (try? await stalled.discard(.max)) ?? 0
                #expect(arrived < total, "\(arrived) bytes: the response was cut")
            }
            // What the client got is recorded: a 200 whose body broke off, a client abort for the worker.
            let pool = upstream.poolName.rawValue
            #expect(
                try await eventually {
                    let text = try await request(server.url("/metrics")).text
                    return prometheusSample(text, #"balancer_requests_total{pool="\#(pool)",class="2xx"}"#) == 1
                })
            let stats = try await request(server.url("/stats")).json
            let pools = try #require(stats["pools"] as? [[String: any Sendable]])
            let worker = try #require((pools.first?["workers"] as? [[String: any Sendable]])?.first)
            #expect((worker["errors"] as? [String: any Sendable])?["client_aborted"] as? Int == 1, "\(worker)")
            // The freed worker serves the next request, on a new upstream connection: the cut one is not reused.
            let next = try await request(server.url("/bytes?n=10"))
            #expect(next.status == 200 && next.body.count == 10)
            #expect(backend.connectionsAccepted == 2)
            #expect(try await eventually { await upstream.balancer.stats().workers[0].pending == 0 })
        }
    }

    @Test("a client that pipelines requests and reads nothing backs the server up; then every answer arrives")
    func pipelinedWithoutReading() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            let count = 1000
            let size = 16 * 1024
            // A small receive window: the kernel holds little of what the client does not read.
            try await withRawConnection(port: server.port, receiveBuffer: 16 * 1024) { connection in
                let one = "GET /whole?n=\(size) HTTP/1.1\r\nHost: x\r\n\r\n"
                try await connection.send(String(repeating: one, count: count))
                // Each response arrives whole in one read: the proxy writes it at its end.
                // Wait until the server takes no more requests (none for a second).
                var taken = -1
                let deadline = ContinuousClock.now + .seconds(30)
                while backend.requestsReceived != taken && ContinuousClock.now < deadline {
                    taken = backend.requestsReceived
                    try await Task.sleep(for: .seconds(1))
                }
                // 1000 answers are 16 MB; the kernel's buffers hold at most about 4 MB of them.
                #expect(taken < count / 2, "the server answered \(taken) of \(count) requests the client did not read")
                print("\(count) pipelined requests, client not reading: the server took \(taken)")
                var answered = 0
                while answered < count, let response = try await connection.readResponse() {
                    guard response.status == 200, response.body.utf8.count == size else { break }
                    answered += 1
                }
                #expect(answered == count, "every request is answered once the client reads")
            }
        }
    }
}

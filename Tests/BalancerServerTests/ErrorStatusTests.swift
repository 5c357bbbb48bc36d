import BalancerServer
import Foundation
import Testing

/// One test per status in the issue's error table: the exact status and JSON `error` code.
@Suite("Error statuses")
struct ErrorStatusTests {
    @Test("400 bad_json: the body is not JSON")
    func badJSON() async throws {
        try await withServer { server in
            let result = try await postJob(server, #"{"op":"multiply","x":6,"y":7"#)
            #expect(result.status == 400)
            #expect(result.errorCode == "bad_json")
        }
    }

    @Test("400 unknown_op: the op is not known, and the message lists the ops")
    func unknownOp() async throws {
        try await withServer { server in
            let result = try await postJob(server, #"{"op":"divide","x":6,"y":7}"#)
            #expect(result.status == 400)
            #expect(result.errorCode == "unknown_op")
            let message = try #require(try result.json["message"] as? String)
            #expect(message.contains("multiply"))
        }
    }

    @Test("400 bad_field: a missing or bad field is named in the message", arguments: [
        (#"{"op":"multiply","x":6}"#, "\"y\""),
        (#"{"op":"multiply","x":"6","y":7}"#, "\"x\""),
        (#"{"op":"multiply","x":6.5,"y":7}"#, "\"x\""),
        (#"{"op":"multiply","x":99999999999999999999,"y":7}"#, "\"x\""),
        (#"{"x":6,"y":7}"#, "\"op\""),
        (#"{"op":"sleep","ms":-1}"#, "\"ms\""),
        (#"{"op":"sleep","ms":999999}"#, "\"ms\""),
        (#"{"op":"spin"}"#, "\"ms\""),
        (#"{"op":"echo"}"#, "\"value\""),
        (#"{"op":"multiply","x":6,"y":7,"timeout_ms":0}"#, "\"timeout_ms\""),
    ])
    func badField(body: String, field: String) async throws {
        try await withServer { server in
            let result = try await postJob(server, body)
            #expect(result.status == 400)
            #expect(result.errorCode == "bad_field")
            let message = try #require(try result.json["message"] as? String)
            #expect(message.contains(field), "message \(message) should name \(field)")
        }
    }

    @Test("404 not_found: an unknown path")
    func notFound() async throws {
        try await withServer { server in
            let result = try await request(server.url("/nope"))
            #expect(result.status == 404)
            #expect(result.errorCode == "not_found")
        }
    }

    @Test("405 method_not_allowed, with an Allow header")
    func methodNotAllowed() async throws {
        try await withServer { server in
            let jobs = try await request(server.url("/jobs"), method: "GET")
            #expect(jobs.status == 405)
            #expect(jobs.errorCode == "method_not_allowed")
            #expect(jobs.header("Allow") == "POST")
            let stats = try await request(server.url("/stats"), method: "DELETE")
            #expect(stats.status == 405)
            #expect(stats.header("Allow") == "GET")
        }
    }

    @Test("408 request_timeout: the head arrives too slowly")
    func headerTimeout() async throws {
        try await withServer({ $0.headerTimeoutMilliseconds = 200 }) { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\n")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 408)
                #expect(response.errorCode == "request_timeout")
                #expect(response.headers["connection"] == "close")
            }
        }
    }

    @Test("408 request_timeout: the body arrives too slowly")
    func bodyTimeout() async throws {
        try await withServer({ $0.bodyTimeoutMilliseconds = 200 }) { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"op\":")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 408)
                #expect(response.errorCode == "request_timeout")
            }
        }
    }

    @Test("413 body_too_large: refused from Content-Length, before the body is sent")
    func bodyTooLargeByLength() async throws {
        try await withServer({ $0.maxBodyBytes = 1_000 }) { server in
            try await withRawConnection(port: server.port) { connection in
                // Only the head is sent: the answer must not wait for the body.
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 413)
                #expect(response.errorCode == "body_too_large")
            }
        }
    }

    @Test("413 body_too_large: a chunked body is refused once it passes the limit")
    func bodyTooLargeWhileStreaming() async throws {
        try await withServer({ $0.maxBodyBytes = 1_000 }) { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                let chunk = String(repeating: "a", count: 600)
                try await connection.send("258\r\n\(chunk)\r\n")
                try await connection.send("258\r\n\(chunk)\r\n")
                // The rest of the body never comes: the answer must not wait for it.
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 413)
                #expect(response.errorCode == "body_too_large")
            }
        }
    }

    @Test("413 through a real client: curl's body over 1 MiB is refused")
    func bodyTooLargeDefaultLimit() async throws {
        try await withServer { server in
            let big = "{\"op\":\"echo\",\"value\":\"" + String(repeating: "x", count: 1_100_000) + "\"}"
            let result = try await postJob(server, big)
            #expect(result.status == 413)
            #expect(result.errorCode == "body_too_large")
        }
    }

    @Test("431 headers_too_large: the head is over max_header_bytes")
    func headersTooLarge() async throws {
        try await withServer({ $0.maxHeaderBytes = 4_096 }) { server in
            try await withRawConnection(port: server.port) { connection in
                let big = String(repeating: "b", count: 8_000)
                try await connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: \(big)\r\n\r\n")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 431)
                #expect(response.errorCode == "headers_too_large")
            }
        }
    }

    @Test("400 bad_request: bytes that are not HTTP")
    func notHTTP() async throws {
        try await withServer { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("HELLO THERE\r\n\r\n")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 400)
                #expect(response.errorCode == "bad_request")
            }
        }
    }

    @Test("422 overflow: multiply past Int64 is an error, not a crash")
    func overflow() async throws {
        try await withServer { server in
            let result = try await postJob(server, #"{"op":"multiply","x":9223372036854775807,"y":2}"#)
            #expect(result.status == 422)
            #expect(result.errorCode == "overflow")
            // The server is still there.
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
        }
    }

    @Test("503 overloaded, with Retry-After: every worker full and no backlog")
    func overloaded() async throws {
        try await withServer({ $0.workers = 1; $0.capacity = 1; $0.backlog = 0 }) { server in
            try await whileAJobRuns(server) {
                #expect(try await eventually { await server.balancer.stats().inFlight == 1 })
                let refused = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
                #expect(refused.status == 503)
                #expect(refused.errorCode == "overloaded")
                #expect(refused.header("Retry-After") == "1")
            }
            #expect(try await eventually { await server.balancer.stats().inFlight == 0 })
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200, "a free worker takes work again")
        }
    }

    @Test("503 queue_timeout, with Retry-After: waited in the backlog too long")
    func queueTimeout() async throws {
        try await withServer({ $0.workers = 1; $0.capacity = 1; $0.queueTimeoutMilliseconds = 100 }) { server in
            try await whileAJobRuns(server) {
                #expect(try await eventually { await server.balancer.stats().inFlight == 1 })
                let late = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
                #expect(late.status == 503)
                #expect(late.errorCode == "queue_timeout")
                #expect(late.header("Retry-After") == "1")
                #expect(await server.balancer.stats().queueTimeouts == 1)
            }
        }
    }

    @Test("503 shutting_down, with Retry-After and Connection: close: a job that arrives during the drain")
    func shuttingDown() async throws {
        try await withServer { server in
            try await withRawConnection(port: server.port) { connection in
                // A whole request first, so the connection is surely accepted and served.
                try await connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try await connection.readResponse()?.status == 200)
                // The head has arrived when the drain starts (the 100 Continue
                // says so), so the connection is kept to answer it; the job in
                // its body comes during the drain, when the balancer takes no new work.
                let job = #"{"op":"multiply","x":6,"y":7}"#
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: \(job.utf8.count)\r\n\r\n")
                #expect(try await connection.readResponse()?.status == 100)
                await server.group.triggerGracefulShutdown()
                #expect(try await eventually { server.server.state.isDraining })
                #expect(try await eventually { await server.balancer.stats().shuttingDown })
                try await connection.send(job)
                let refused = try #require(try await connection.readResponse())
                #expect(refused.status == 503)
                #expect(refused.errorCode == "shutting_down")
                #expect(refused.headers["retry-after"] == "1")
                #expect(refused.headers["connection"] == "close")
                #expect(try await connection.readUntilClosed())
            }
        }
    }

    @Test("504 job_timeout: timeout_ms passes, and the running job is cancelled")
    func jobTimeout() async throws {
        try await withServer { server in
            let clock = ContinuousClock()
            let start = clock.now
            let result = try await postJob(server, #"{"op":"spin","ms":10000,"timeout_ms":100}"#)
            #expect(result.status == 504)
            #expect(result.errorCode == "job_timeout")
            // Both long before the 10 s spin would have ended by itself: the
            // answer, and the spin seeing the cancellation (nothing left running).
            let deadline = start + .seconds(8)
            #expect(clock.now < deadline)
            #expect(try await eventually(timeout: deadline - clock.now) { await server.balancer.stats().inFlight == 0 })
        }
    }
}

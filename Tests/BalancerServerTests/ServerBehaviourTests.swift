import BalancerCore
import BalancerServer
import Foundation
import Testing

@Suite("Server behaviour over real sockets")
struct ServerBehaviourTests {
    @Test("POST /jobs multiply answers 42 with the worker and timings")
    func multiply() async throws {
        try await withServer { server in
            let result = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
            #expect(result.status == 200)
            #expect(result.header("Content-Type") == "application/json")
            let json = try result.json
            #expect(json["op"] as? String == "multiply")
            #expect((json["result"] as? NSNumber)?.int64Value == 42)
            #expect((json["worker"] as? NSNumber).map { (0..<8).contains($0.intValue) } == true)
            #expect(json["queued_us"] is NSNumber)
            #expect(json["run_us"] is NSNumber)
        }
    }

    @Test("echo gives back any JSON value unchanged")
    func echo() async throws {
        try await withServer { server in
            let result = try await postJob(server, #"{"op":"echo","value":{"a":[1,-2.5e3,true,null],"s":"é\n\"x\""}}"#)
            #expect(result.status == 200)
            #expect(result.text.contains(#""result":{"a":[1,-2.5e3,true,null],"s":"é\n\"x\""}"#))
        }
    }

    @Test("sleep and spin run for the asked time and report it")
    func sleepAndSpin() async throws {
        try await withServer { server in
            let clock = ContinuousClock()
            let start = clock.now
            let slept = try await postJob(server, #"{"op":"sleep","ms":100}"#)
            #expect(slept.status == 200)
            #expect((try slept.json["result"] as? NSNumber)?.intValue == 100)
            let spun = try await postJob(server, #"{"op":"spin","ms":50}"#)
            #expect(spun.status == 200)
            #expect(clock.now - start >= .milliseconds(150))
        }
    }

    @Test("GET /stats has every documented field")
    func statsJSON() async throws {
        try await withServer({ $0.workers = 3 }) { server in
            _ = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
            let json = try await request(server.url("/stats")).json
            #expect(json["uptime_s"] is NSNumber)
            #expect(json["strategy"] as? String == "least-loaded")
            let workers = try #require(json["workers"] as? [[String: Any]])
            #expect(workers.count == 3)
            for worker in workers {
                for key in ["id", "state", "pending", "pending_max", "completed", "failed"] {
                    #expect(worker[key] != nil, "worker lacks \(key)")
                }
            }
            let queue = try #require(json["queue"] as? [String: Any])
            for key in ["depth", "limit", "timeout_ms", "overloaded", "timed_out"] {
                #expect(queue[key] != nil, "queue lacks \(key)")
            }
            let totals = try #require(json["totals"] as? [String: Any])
            #expect((totals["submitted"] as? NSNumber)?.intValue == 1)
            #expect((totals["completed"] as? NSNumber)?.intValue == 1)
            #expect(totals["failed"] != nil && totals["cancelled"] != nil)
            #expect(json["pending_mean"] is NSNumber)
            #expect(json["pending_variance"] is NSNumber)
        }
    }

    @Test("GET /stats?format=text is a table with one line per worker and the mean and variance")
    func statsText() async throws {
        try await withServer({ $0.workers = 4 }) { server in
            let result = try await request(server.url("/stats?format=text"))
            #expect(result.status == 200)
            #expect(result.header("Content-Type")?.hasPrefix("text/plain") == true)
            let lines = result.text.split(separator: "\n")
            #expect(lines.filter { $0.contains("active") }.count == 4)
            #expect(lines.contains { $0.hasPrefix("pending mean 0.00  variance 0.00") })
        }
    }

    @Test("/healthz is 200; /readyz is 200, then 503 once the drain has begun")
    func health() async throws {
        try await withServer { server in
            #expect(try await request(server.url("/healthz")).status == 200)
            #expect(try await request(server.url("/readyz")).status == 200)
            try await withRawConnection(port: server.port) { connection in
                // A whole request first, so the connection is surely accepted and served.
                try await connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try await connection.readResponse()?.status == 200)
                // A request in progress keeps this connection open through the drain:
                // its head has surely been read once the 100 Continue is back.
                try await connection.send("GET /readyz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                #expect(try await connection.readResponse()?.status == 100)
                await server.group.triggerGracefulShutdown()
                #expect(try await eventually { server.server.state.isDraining })
                try await connection.send("x")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 503)
                #expect(response.errorCode == "draining")
            }
        }
    }

    @Test("keep-alive: many requests on one connection")
    func keepAlive() async throws {
        try await withServer { server in
            try await withRawConnection(port: server.port) { connection in
                for i in 1...20 {
                    let job = #"{"op":"multiply","x":\#(i),"y":2}"#
                    try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \(job.utf8.count)\r\n\r\n\(job)")
                    let response = try #require(try await connection.readResponse())
                    #expect(response.status == 200)
                    #expect(response.body.contains("\"result\":\(i * 2)"))
                }
            }
        }
    }

    @Test("pipelining: requests sent together are answered in order")
    func pipelining() async throws {
        try await withServer { server in
            try await withRawConnection(port: server.port) { connection in
                var batch = ""
                // A slow job first: the quick ones behind it must still come back after it.
                let slow = #"{"op":"sleep","ms":100}"#
                batch += "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \(slow.utf8.count)\r\n\r\n\(slow)"
                for i in 1...5 {
                    let job = #"{"op":"multiply","x":\#(i),"y":10}"#
                    batch += "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \(job.utf8.count)\r\n\r\n\(job)"
                }
                batch += "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                try await connection.send(batch)
                let first = try #require(try await connection.readResponse())
                #expect(first.body.contains("\"op\":\"sleep\""))
                for i in 1...5 {
                    let response = try #require(try await connection.readResponse())
                    #expect(response.body.contains("\"result\":\(i * 10)"))
                }
                #expect(try await connection.readResponse()?.body.contains("ok") == true)
            }
        }
    }

    @Test(
        "a half-arrived head pipelined behind a whole request is timed like a first head: 408, then close, during a drain too",
        arguments: [false, true])
    func pipelinedPartialHead(drain: Bool) async throws {
        try await withServer({ $0.headerTimeoutMilliseconds = 300; $0.idleTimeoutMilliseconds = 5_000 }) { server in
            try await withRawConnection(port: server.port) { connection in
                // One write: the decoder keeps "GET /hea" once it has taken the first request.
                try await connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /hea")
                #expect(try await connection.readResponse()?.status == 200)
                // A drain closes idle connections at once, but not one with a head on its way.
                if drain { await server.group.triggerGracefulShutdown() }
                let timedOut = try #require(try await connection.readResponse(), "closed without a 408")
                #expect(timedOut.status == 408)
                #expect(timedOut.errorCode == "request_timeout")
                #expect(timedOut.headers["connection"] == "close")
                #expect(try await connection.readUntilClosed())
            }
        }
    }

    @Test("whole requests of every framing, then nothing: the connection is idle, closed without a 408")
    func wholeRequestsLeaveTheConnectionIdle() async throws {
        let job = #"{"op":"multiply","x":6,"y":7}"#
        let fixed = "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \(job.utf8.count)\r\n\r\n\(job)"
        let chunked =
            "POST /jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + String(job.utf8.count, radix: 16) + "\r\n\(job)\r\n0\r\n\r\n"
        let get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        // Each write, and how many answers it gets.
        let writes: [(String, Int)] = [(get, 1), (fixed, 1), (chunked, 1), (get + fixed, 2), (fixed + chunked + get, 3)]
        // A partial head mistaken for idleness would get a 408 at the header
        // timeout, well before the idle timeout closes the connection quietly.
        // The header timeout leaves room for the pauses below on a loaded machine.
        try await withServer({ $0.headerTimeoutMilliseconds = 1_000; $0.idleTimeoutMilliseconds = 3_000 }) { server in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (text, answers) in writes {
                    group.addTask {
                        try await withRawConnection(port: server.port) { connection in
                            try await connection.send(text)
                            for _ in 0..<answers { #expect(try await connection.readResponse()?.status == 200, "\(text)") }
                            #expect(try await connection.readUntilClosed(), "nothing more after the answers: \(text)")
                        }
                    }
                }
                group.addTask {
                    // The head's blank line split between two reads (the pause makes that likely).
                    try await withRawConnection(port: server.port) { connection in
                        try await connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r")
                        try await Task.sleep(for: .milliseconds(50))
                        try await connection.send("\n")
                        #expect(try await connection.readResponse()?.status == 200)
                        #expect(try await connection.readUntilClosed(), "nothing more after the answer")
                    }
                }
                group.addTask {
                    // The body after the head, in a later read (the head is answered 100 Continue first).
                    try await withRawConnection(port: server.port) { connection in
                        try await connection.send(
                            "POST /jobs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: \(job.utf8.count)\r\n\r\n")
                        #expect(try await connection.readResponse()?.status == 100)
                        try await connection.send(job)
                        #expect(try await connection.readResponse()?.status == 200)
                        #expect(try await connection.readUntilClosed(), "nothing more after the answer")
                    }
                }
                try await group.waitForAll()
            }
        }
    }

    @Test("Expect: 100-continue gets 100 Continue, then the answer once the body is sent")
    func expectContinue() async throws {
        try await withServer { server in
            try await withRawConnection(port: server.port) { connection in
                let job = #"{"op":"multiply","x":6,"y":7}"#
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: \(job.utf8.count)\r\n\r\n")
                #expect(try await connection.readResponse()?.status == 100)
                try await connection.send(job)
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 200)
                #expect(response.body.contains("\"result\":42"))
            }
        }
    }

    @Test("HTTP/1.0: keep-alive when asked for, close otherwise")
    func http10() async throws {
        try await withServer { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                let kept = try #require(try await connection.readResponse())
                #expect(kept.status == 200)
                #expect(kept.headers["connection"] == "keep-alive")
                try await connection.send("GET /healthz HTTP/1.0\r\n\r\n")
                let last = try #require(try await connection.readResponse())
                #expect(last.status == 200)
                #expect(last.headers["connection"] == "close")
                #expect(try await connection.readUntilClosed())
            }
        }
    }

    @Test("Connection: close is honoured")
    func connectionClose() async throws {
        try await withServer { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 200)
                #expect(response.headers["connection"] == "close")
                #expect(try await connection.readUntilClosed())
            }
        }
    }

    @Test("an idle keep-alive connection is closed after idle_timeout_ms")
    func idleTimeout() async throws {
        try await withServer({ $0.idleTimeoutMilliseconds = 1_000 }) { server in
            // The clock starts before the connection opens, so the idle time is
            // all inside it however late the request goes out or the answer is read.
            let clock = ContinuousClock()
            let start = clock.now
            try await withRawConnection(port: server.port) { connection in
                // On a loaded machine the new connection can sit idle past the
                // timeout before the request goes out: the server closing it then
                // (the send fails, or no answer comes) is the idle timeout too.
                if (try? await connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")) != nil,
                    let response = try? await connection.readResponse()
                {
                    #expect(response.status == 200)
                }
                // Closed by the server: the end of the stream, or a reset.
                #expect((try? await connection.readUntilClosed()) ?? true)
                #expect(clock.now - start >= .milliseconds(950))
            }
        }
    }

    @Test("a client that pipelines requests and takes none of the answers is disconnected after send_timeout_ms")
    func sendTimeout() async throws {
        try await withServer({ $0.sendTimeoutMilliseconds = 300 }) { server in
            let page = try await request(server.url("/dashboard")).body.count
            let count = 2_000
            // A small receive window: the kernel holds little of what the client does not read.
            try await withRawConnection(port: server.port, receiveBuffer: 4_096) { stalled in
                // About 30 MB of answers for 80 KB of requests: far more than the kernel's buffers hold.
                try await stalled.send(String(repeating: "GET /dashboard HTTP/1.1\r\nHost: x\r\n\r\n", count: count))
                // The connection is stuck writing: others are served meanwhile.
                #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
                #expect(try await eventually { try await sendTimeouts(server) == 1 }, "the stalled connection is closed and counted")
                // Closed: what the kernel held arrives, then the end (or a reset).
                let arrived = (try? await stalled.discard(.max)) ?? 0
                #expect(arrived < count * page, "\(arrived) bytes: the connection was cut, not served to the end")
            }
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
            #expect(try await sendTimeouts(server) == 1, "a client that reads its answers is not affected")
            let metrics = try await request(server.url("/metrics")).text
            #expect(prometheusSample(metrics, "balancer_send_timeouts_total") == 1)
        }
    }

    @Test("a client that disconnects while its job is queued: the job never runs")
    func disconnectWhileQueued() async throws {
        try await withServer({ $0.workers = 1; $0.capacity = 1 }) { server in
            try await whileAJobRuns(server) {
                #expect(try await eventually { await server.balancer.stats().inFlight == 1 })
                try await withRawConnection(port: server.port) { connection in
                    try await connection.postJob(#"{"op":"multiply","x":6,"y":7}"#)
                    #expect(try await eventually { await server.balancer.stats().backlogDepth == 1 })
                }  // closes the connection while the job waits in the backlog
                #expect(try await eventually { await server.balancer.stats().cancelled == 1 })
            }  // cancels the running job: the worker is free
            #expect(try await eventually { await server.balancer.stats().inFlight == 0 })
            // Sent last, so it would queue behind the first queued job had that one been kept.
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
            // The answer comes before the worker reports done: wait for the report.
            #expect(try await eventually { await server.balancer.stats().workers[0].pending == 0 })
            let stats = await server.balancer.stats()
            #expect(stats.workers[0].completed == 1, "only the job sent last ran")
            #expect(stats.cancelled == 2)
            #expect(stats.inFlight == 0)
            #expect(stats.workers[0].pending == 0)
        }
    }

    @Test("a client that disconnects while its job runs: the result is dropped and the counts stay exact")
    func disconnectWhileRunning() async throws {
        try await withServer({ $0.workers = 2 }) { server in
            try await withRawConnection(port: server.port) { connection in
                let job = #"{"op":"sleep","ms":5000}"#
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \(job.utf8.count)\r\n\r\n\(job)")
                #expect(try await eventually { await server.balancer.stats().inFlight == 1 })
            }
            #expect(try await eventually { await server.balancer.stats().cancelled == 1 })
            #expect(try await eventually {
                let stats = await server.balancer.stats()
                return stats.workers.allSatisfy { $0.pending == 0 } && stats.inFlight == 0
            })
            let stats = await server.balancer.stats()
            #expect(stats.submitted == stats.completed + stats.failed + stats.cancelled + stats.overloaded + stats.queueTimeouts + stats.shutDown + stats.inFlight)
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
        }
    }

    @Test("graceful drain: in-flight jobs get 200 with Connection: close; idle connections are closed")
    func drain() async throws {
        try await withServer({ $0.workers = 1; $0.capacity = 1 }) { server in
            try await withRawConnection(port: server.port) { idle in
                try await idle.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try await idle.readResponse()?.status == 200)
                try await withRawConnection(port: server.port) { busy in
                    // The busy connection's job waits behind a long one, so it is
                    // surely still in flight when the drain begins, however slow the machine.
                    try await whileAJobRuns(server) {
                        #expect(try await eventually { await server.balancer.stats().inFlight == 1 })
                        try await busy.postJob(#"{"op":"multiply","x":6,"y":7}"#)
                        #expect(try await eventually { await server.balancer.stats().backlogDepth == 1 })
                        await server.group.triggerGracefulShutdown()
                        #expect(try await idle.readUntilClosed(), "the idle connection is closed at once")
                    }  // cancels the long job: the queued one runs during the drain
                    let response = try #require(try await busy.readResponse())
                    #expect(response.status == 200)
                    #expect(response.body.contains("\"result\":42"))
                    #expect(response.headers["connection"] == "close")
                    #expect(try await busy.readUntilClosed())
                }
            }
        }
    }

    @Test("when the grace period ends, the jobs still running are answered 503 shutting_down")
    func gracePeriodEnds() async throws {
        try await withServer({ $0.gracePeriodMilliseconds = 300 }) { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.postJob(#"{"op":"sleep","ms":10000}"#)
                #expect(try await eventually { await server.balancer.stats().inFlight == 1 })
                let clock = ContinuousClock()
                let start = clock.now
                await server.group.triggerGracefulShutdown()
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 503)
                #expect(response.errorCode == "shutting_down")
                #expect(response.headers["connection"] == "close")
                // Long before the job would have ended by itself.
                #expect(clock.now - start < .seconds(8))
            }
        }
    }

    @Test("max_connections: one more connection is answered 503 and closed")
    func maxConnections() async throws {
        try await withServer({ $0.maxConnections = 2 }) { server in
            try await withRawConnection(port: server.port) { a in
                try await a.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try await a.readResponse()?.status == 200)
                try await withRawConnection(port: server.port) { b in
                    try await b.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    #expect(try await b.readResponse()?.status == 200)
                    try await withRawConnection(port: server.port) { c in
                        let response = try #require(try await c.readResponse())
                        #expect(response.status == 503)
                        #expect(response.errorCode == "too_many_connections")
                    }
                }
            }
        }
    }

    @Test("garbage input does not stop others being served")
    func garbage() async throws {
        try await withServer({ $0.headerTimeoutMilliseconds = 300 }) { server in
            for junk in ["\u{0}\u{1}\u{2}\r\n\r\n", "GET / HTTP/9.9\r\n\r\n", "POST /jobs HTTP/1.1\r\nContent-Length: -5\r\n\r\n", "\r\n\r\n\r\n"] {
                try await withRawConnection(port: server.port) { connection in
                    try await connection.send(junk)
                    _ = try? await connection.readResponse()
                }
            }
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
        }
    }
}

import BalancerCore
import Dispatch
import Foundation
import NIOCore
import Synchronization
import Testing

@testable import BalancerServer

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// An access-log sink that keeps the lines, for the tests to read.
final class CapturedAccessLog: Sendable {
    private let captured = Mutex<[String]>([])

    var sink: AccessLogSink {
        AccessLogSink { line in
            self.captured.withLock { $0.append(String(buffer: line)) }
        }
    }

    var lines: [String] { captured.withLock { $0 } }

    /// Each line parsed as a JSON object (by Foundation, not the server's own parser).
    var entries: [[String: any Sendable]] {
        get throws {
            try lines.map { line in
                #expect(line.hasSuffix("\n") && line.dropLast().allSatisfy { $0 != "\n" }, "one line per entry: \(line)")
                let object = try JSONSerialization.jsonObject(with: Data(line.utf8))
                return try #require(object as? [String: any Sendable], "not a JSON object: \(line)")
            }
        }
    }
}

/// `latency_us` of a /stats object: kind (queue, run, total) to its figures.
private func latency(_ value: Any?) throws -> [String: [String: Int]] {
    let object = try #require(value as? [String: Any], "no latency_us")
    var kinds: [String: [String: Int]] = [:]
    for kind in ["queue", "run", "total"] {
        let figures = try #require(object[kind] as? [String: Any], "no latency_us.\(kind)")
        var ints: [String: Int] = [:]
        for name in ["count", "p50", "p90", "p99", "max"] {
            ints[name] = try #require(figures[name] as? Int, "latency_us.\(kind).\(name) is not an integer")
        }
        kinds[kind] = ints
    }
    return kinds
}

/// Checks p50 <= p90 <= p99 <= max for each kind.
private func expectOrdered(_ latency: [String: [String: Int]]) {
    for (kind, figures) in latency {
        let (p50, p90, p99, max) = (figures["p50"]!, figures["p90"]!, figures["p99"]!, figures["max"]!)
        #expect(p50 <= p90 && p90 <= p99 && p99 <= max, "\(kind): \(figures)")
    }
}

/// The value of the sample `name{labels}` in Prometheus text, if present.
func prometheusSample(_ text: String, _ series: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.dropFirst(series.count + 1))
    }
    return nil
}

/// Whether `id` is a generated request id: 32 lowercase hex digits.
private func isGenerated(_ id: String?) -> Bool {
    guard let id else { return false }
    return id.utf8.count == 32 && id.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
}

@Suite("Observability: latency histograms, /metrics, X-Request-Id, the access log")
struct ObservabilityTests {
    @Test("each worker's histograms count exactly the jobs it completed, the pool's all of them; p50 <= p90 <= p99 <= max")
    func histogramCounts() async throws {
        try await withServer({ $0.workers = 4 }) { server in
            try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<40 {
                    group.addTask { try await postJob(server, #"{"op":"multiply","x":\#(i),"y":3}"#).status }
                }
                for try await status in group { #expect(status == 200) }
            }
            // A job that fails runs but is not timed: it is not `completed`.
            #expect(try await postJob(server, #"{"op":"multiply","x":9223372036854775807,"y":2}"#).status == 422)
            // A worker's `completed` counts when it reports done, just after
            // its answer went out: wait for every report.
            #expect(try await eventually {
                let stats = await server.balancer.stats()
                return stats.workers.allSatisfy { $0.pending == 0 } && stats.completed + stats.failed == 41
            })
            let stats = try await request(server.url("/stats")).json
            let workers = try #require(stats["workers"] as? [[String: Any]])
            #expect(workers.count == 4)
            var completed = 0
            for worker in workers {
                let done = try #require(worker["completed"] as? Int)
                let figures = try latency(worker["latency_us"])
                for kind in ["queue", "run", "total"] { #expect(figures[kind]?["count"] == done, "\(kind) of \(worker)") }
                expectOrdered(figures)
                completed += done
            }
            #expect(completed == 40)
            let pool = try latency(stats["latency_us"])
            for kind in ["queue", "run", "total"] { #expect(pool[kind]?["count"] == 40) }
            expectOrdered(pool)
        }
    }

    @Test("a 50 ms sleep job shows run p50 >= 50 ms in /stats; the text form shows the total's p50 and p99")
    func sleepRunTime() async throws {
        try await withServer({ $0.workers = 1 }) { server in
            for _ in 0..<3 {
                #expect(try await postJob(server, #"{"op":"sleep","ms":50}"#).status == 200)
            }
            let stats = try await request(server.url("/stats")).json
            let pool = try latency(stats["latency_us"])
            #expect(pool["run"]!["count"] == 3)
            #expect(pool["run"]!["p50"]! >= 50_000)
            #expect(pool["total"]!["p50"]! >= 50_000)
            let worker = try latency(try #require((stats["workers"] as? [[String: Any]])?.first)["latency_us"])
            #expect(worker["run"]!["p50"]! >= 50_000)

            let text = try await request(server.url("/stats?format=text")).text
            let lines = text.split(separator: "\n")
            #expect(lines.contains { $0.hasSuffix("total_p50_us  total_p99_us") })
            let poolLine = try #require(lines.first { $0.hasPrefix("latency total p50 ") }, "\(text)")
            let numbers = poolLine.split(separator: " ").compactMap { Int($0) }
            #expect(numbers.count == 3 && numbers[0] >= 50_000 && numbers[0] <= numbers[1] && numbers[2] == 3, "pool line: \(poolLine)")
        }
    }

    @Test("metrics off: /stats has no latency_us, /metrics is 404 JSON")
    func metricsOff() async throws {
        try await withServer({
            $0.workers = 2
            $0.metrics = false
        }) { server in
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
            let stats = try await request(server.url("/stats"))
            #expect(!stats.text.contains("latency_us"))
            #expect(try stats.json["workers"] != nil)
            let text = try await request(server.url("/stats?format=text")).text
            #expect(!text.contains("latency") && !text.contains("p50"))
            let metrics = try await request(server.url("/metrics"))
            #expect(metrics.status == 404)
            #expect(metrics.errorCode == "not_found")
            #expect(metrics.header("content-type") == "application/json")
        }
    }

    @Test("GET /metrics: answers by status class, per-worker pending, histograms, the overloaded counter")
    func metricsText() async throws {
        try await withServer({
            $0.workers = 2
            $0.capacity = 1
            $0.backlog = 0
            $0.maxJobMilliseconds = 60_000
        }) { server in
            for i in 0..<5 {
                #expect(try await postJob(server, #"{"op":"multiply","x":\#(i),"y":2}"#).status == 200)
            }
            #expect(try await postJob(server, "not json").status == 400)
            // Two sleeps fill both workers (capacity 1, no backlog): a third is refused. They
            // outlast any slow scrape; cancelled at the end, their clients leave and the jobs end.
            let sleeps = (0..<2).map { _ in Task { try await postJob(server, #"{"op":"sleep","ms":60000}"#).status } }
            defer { sleeps.forEach { $0.cancel() } }
            #expect(
                try await eventually { try await request(server.url("/stats")).json["totals"].flatMap { ($0 as? [String: Any])?["in_flight"] as? Int } == 2 })
            #expect(try await postJob(server, #"{"op":"multiply","x":1,"y":2}"#).status == 503)

            let scrape = try await request(server.url("/metrics"))
            #expect(scrape.status == 200)
            #expect(scrape.header("content-type") == "text/plain; version=0.0.4; charset=utf-8")
            let text = scrape.text
            #expect(prometheusSample(text, #"balancer_requests_total{pool="jobs",class="2xx"}"#) == 5)
            #expect(prometheusSample(text, #"balancer_requests_total{pool="jobs",class="4xx"}"#) == 1)
            #expect(prometheusSample(text, #"balancer_requests_total{pool="jobs",class="5xx"}"#) == 1)
            #expect(prometheusSample(text, #"balancer_overloaded_total{pool="jobs"}"#) == 1)
            #expect(prometheusSample(text, #"balancer_worker_pending{pool="jobs",worker="0"}"#) == 1)
            #expect(prometheusSample(text, #"balancer_worker_pending{pool="jobs",worker="1"}"#) == 1)
            #expect(prometheusSample(text, #"balancer_in_flight{pool="jobs"}"#) == 2)
            #expect(prometheusSample(text, #"balancer_backlog_depth{pool="jobs"}"#) == 0)
            #expect(prometheusSample(text, #"balancer_run_seconds_count{pool="jobs"}"#) == 5)
            #expect(prometheusSample(text, #"balancer_queue_wait_seconds_count{pool="jobs"}"#) == 5)
            #expect(prometheusSample(text, #"balancer_request_duration_seconds_bucket{pool="jobs",le="+Inf"}"#) == 5)
            // A second scrape does not count the overloaded job again.
            let again = try await request(server.url("/metrics")).text
            #expect(prometheusSample(again, #"balancer_overloaded_total{pool="jobs"}"#) == 1)
        }
    }

    @Test("a backend removed at run time loses its workers' pending gauges")
    func removedBackendGauges() async throws {
        let first = try await UpstreamTestBackend.start()
        let second = try await UpstreamTestBackend.start()
        defer { Task { await first.stop(); await second.stop() } }
        try await withProxy([first.port, second.port]) { server, _ in
            let before = try await request(server.url("/metrics")).text
            for worker in [0, 2, 4, 6] {
                #expect(prometheusSample(before, #"balancer_worker_pending{pool="upstream",worker="\#(worker)",backend="backend1"}"#) == 0)
                #expect(prometheusSample(before, #"balancer_worker_pending{pool="upstream",worker="\#(worker + 1)",backend="backend2"}"#) == 0)
            }
            let removed = try await request(server.url("/admin/backends/backend2"), method: "DELETE")
            #expect(removed.status == 202)
            #expect(
                try await eventually {
                    !(try await request(server.url("/metrics")).text.contains(#"backend="backend2""#))
                })
            let after = try await request(server.url("/metrics")).text
            #expect(prometheusSample(after, #"balancer_worker_pending{pool="upstream",worker="0",backend="backend1"}"#) == 0)
        }
    }

    @Test("a backend added and removed at run time leaves no latency histograms behind; the pool keeps its counts")
    func removedBackendHistograms() async throws {
        let first = try await UpstreamTestBackend.start()
        let second = try await UpstreamTestBackend.start()
        defer { Task { await first.stop(); await second.stop() } }
        try await withProxy([first.port]) { server, _ in
            let latency = try #require(server.server.observer.metrics?.pool(PoolName(rawValue: "upstream"))?.latency)
            let added = try await request(
                server.url("/admin/backends"), method: "POST",
                body: #"{"pool": "upstream", "name": "extra", "url": "http://127.0.0.1:\#(second.port)", "connections": 2}"#)
            #expect(added.status == 201, "\(added.text)")
            var sent = 0
            while second.requestsReceived == 0 && sent < 200 {
                #expect(try await request(server.url("/status?code=204")).status == 204)
                sent += 1
            }
            // Each forward is timed just after its answer.
            #expect(try await eventually { latency.snapshot().pool.total.count == UInt64(sent) })
            #expect(latency.snapshot().workers.keys.contains { $0 >= 4 }, "the added backend's workers have histograms")

            let removed = try await request(server.url("/admin/backends/extra"), method: "DELETE")
            #expect(removed.status == 202)
            #expect(try await eventually { Set(latency.snapshot().workers.keys) == Set(0..<4) })
            #expect(latency.snapshot().pool.total.count == UInt64(sent), "the pool still counts what the removed workers served")
        }
    }

    @Test("X-Request-Id: echoed when sane, generated when absent, replaced when too long or not printable ASCII")
    func requestID() async throws {
        try await withServer { server in
            let given = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
            #expect(isGenerated(given.header("x-request-id")))

            let echoed = try await request(server.url("/healthz"), headers: ["X-Request-Id": "client-id 42/abc"])
            #expect(echoed.header("x-request-id") == "client-id 42/abc")

            let long = String(repeating: "a", count: 129)
            let replaced = try await request(server.url("/stats"), headers: ["X-Request-Id": long])
            #expect(isGenerated(replaced.header("x-request-id")))
            let longest = String(repeating: "b", count: 128)
            #expect(try await request(server.url("/stats"), headers: ["X-Request-Id": longest]).header("x-request-id") == longest)

            // Errors carry it too, from the router and from the connection's own checks.
            let notFound = try await request(server.url("/nowhere"), headers: ["X-Request-Id": "err-1"])
            #expect(notFound.status == 404 && notFound.header("x-request-id") == "err-1")

            try await withRawConnection(port: server.port) { connection in
                var bytes = ByteBuffer(string: "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: caf")
                bytes.writeBytes([0xC3, 0xA9])  // é in UTF-8: not ASCII
                bytes.writeString("\r\n\r\n")
                try await connection.send(bytes)
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 200)
                #expect(isGenerated(response.headers["x-request-id"]))
            }
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("NOT HTTP AT ALL\r\n\r\n")
                let response = try #require(try await connection.readResponse())
                #expect(response.status == 400)
                #expect(isGenerated(response.headers["x-request-id"]))
            }
        }
    }

    @Test("through the upstream pool: the backend sees the request's X-Request-Id and the client gets it back")
    func requestIDUpstream() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            let given = try await request(server.url("/echo"), headers: ["X-Request-Id": "trace-7"])
            #expect(given.header("x-req-x-request-id") == "trace-7")
            #expect(given.header("x-request-id") == "trace-7")

            let generated = try await request(server.url("/echo"))
            let id = try #require(generated.header("x-request-id"))
            #expect(isGenerated(id))
            #expect(generated.header("x-req-x-request-id") == id)

            let bad = try await request(server.url("/echo"), headers: ["X-Request-Id": String(repeating: "x", count: 200)])
            let replaced = try #require(bad.header("x-request-id"))
            #expect(isGenerated(replaced))
            #expect(bad.header("x-req-x-request-id") == replaced, "the backend gets the replacement, not the bad id")
        }
    }

    @Test("upstream pool: /stats has latency_us per worker and for the pool; /metrics labels pending with the backend")
    func upstreamLatency() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            for _ in 0..<6 { #expect(try await request(server.url("/status?code=204")).status == 204) }
            // The forward is timed when the worker finishes, just after the client has its answer.
            #expect(
                try await eventually {
                    let upstream = (try await request(server.url("/stats")).json["pools"] as? [[String: Any]])?.first
                    return (try? latency(upstream?["latency_us"]))?["total"]?["count"] == 6
                })
            let upstream = try #require((try await request(server.url("/stats")).json["pools"] as? [[String: Any]])?.first)
            expectOrdered(try latency(upstream["latency_us"]))
            let workers = try #require(upstream["workers"] as? [[String: Any]])
            #expect(workers.count == 4)
            var counted = 0
            for worker in workers {
                let figures = try latency(worker["latency_us"])
                #expect(figures["run"]?["count"] == figures["total"]?["count"])
                expectOrdered(figures)
                counted += figures["run"]!["count"]!
            }
            #expect(counted == 6)

            let text = try await request(server.url("/metrics")).text
            #expect(prometheusSample(text, #"balancer_requests_total{pool="upstream",class="2xx"}"#) == 6)
            #expect(prometheusSample(text, #"balancer_worker_pending{pool="upstream",worker="3",backend="backend1"}"#) == 0)
            #expect(prometheusSample(text, #"balancer_run_seconds_count{pool="upstream"}"#) == 6)
        }
    }

    @Test("access log: one JSON line per answered request, errors included, with the request's id, worker and sizes")
    func accessLogLines() async throws {
        let log = CapturedAccessLog()
        try await withServer({ $0.accessLog = true }, accessLog: log.sink) { server in
            let job = #"{"op":"multiply","x":6,"y":7}"#
            let ok = try await request(server.url("/jobs"), method: "POST", body: job, headers: ["X-Request-Id": "job-1"])
            let bad = try await postJob(server, "{")
            let missing = try await request(server.url("/missing?q=1"))
            // Lines reach the sink from the access log's own thread, just after the answers.
            #expect(try await eventually { log.lines.count == 3 })
            let entries = try log.entries
            try #require(entries.count == 3, "\(log.lines)")

            let first = entries[0]
            #expect(first["request_id"] as? String == "job-1")
            #expect(first["method"] as? String == "POST")
            #expect(first["path"] as? String == "/jobs")
            #expect(first["status"] as? Int == 200)
            #expect(first["pool"] as? String == "jobs")
            #expect(first["worker"] as? Int == (try ok.json["worker"] as? Int))
            #expect(first["queue_us"] as? Int == (try ok.json["queued_us"] as? Int))
            #expect(first["run_us"] as? Int == (try ok.json["run_us"] as? Int))
            #expect((first["total_us"] as? Int ?? -1) >= 0)
            #expect(first["bytes_in"] as? Int == job.utf8.count)
            #expect(first["bytes_out"] as? Int == ok.body.count)
            #expect((first["time"] as? String)?.wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/) != nil)

            let second = entries[1]
            #expect(second["status"] as? Int == 400)
            #expect(second["pool"] as? String == "jobs")
            #expect(second["worker"] is NSNull)
            #expect(second["request_id"] as? String == bad.header("x-request-id"))
            #expect(second["bytes_in"] as? Int == 1)
            #expect(second["bytes_out"] as? Int == bad.body.count)

            let third = entries[2]
            #expect(third["status"] as? Int == 404)
            #expect(third["path"] as? String == "/missing?q=1")
            #expect(third["pool"] as? String == "server")
            #expect(third["request_id"] as? String == missing.header("x-request-id"))
        }
    }

    @Test("access log through the upstream pool names the worker and its backend")
    func accessLogUpstream() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        let log = CapturedAccessLog()
        try await withServer(
            {
                $0.upstreams = ["http://127.0.0.1:\(backend.port)"]
                $0.connectionsPerUpstream = 2
                $0.accessLog = true
            }, accessLog: log.sink
        ) { server in
            let answer = try await request(server.url("/echo"), method: "POST", body: "hello")
            #expect(answer.status == 200)
            #expect(try await eventually { log.lines.count == 1 })
            let entry = try #require(try log.entries.first)
            #expect(entry["pool"] as? String == "upstream")
            #expect(entry["backend"] as? String == "backend1")
            #expect([0, 1].contains(entry["worker"] as? Int ?? -1))
            #expect(entry["status"] as? Int == 200)
            #expect(entry["bytes_in"] as? Int == 5)
            #expect(entry["bytes_out"] as? Int == 5)
            #expect(entry["request_id"] as? String == answer.header("x-request-id"))
        }
    }

    @Test("access log: errors answered before any pool ran the request get their line too (413, and a dead backend)")
    func accessLogEarlyErrors() async throws {
        let log = CapturedAccessLog()
        try await withServer(
            {
                $0.maxBodyBytes = 10
                $0.upstreams = ["http://127.0.0.1:1"]  // nothing listens on port 1
                $0.connectionsPerUpstream = 1
                $0.accessLog = true
            }, accessLog: log.sink
        ) { server in
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("POST /jobs HTTP/1.1\r\nHost: x\r\nX-Request-Id: big-1\r\nContent-Length: 100\r\n\r\n")
                #expect(try await connection.readResponse()?.status == 413)
            }
            let failed = try await request(server.url("/anything"))
            #expect(failed.status >= 500)
            #expect(try await eventually { log.lines.count == 2 })
            let entries = try log.entries
            try #require(entries.count == 2, "\(log.lines)")
            #expect(entries[0]["request_id"] as? String == "big-1")
            #expect(entries[0]["status"] as? Int == 413)
            #expect(entries[0]["pool"] as? String == "server")
            #expect(entries[1]["status"] as? Int == failed.status)
            #expect(entries[1]["pool"] as? String == "upstream")
            #expect(entries[1]["worker"] is NSNull)
            #expect(entries[1]["request_id"] as? String == failed.header("x-request-id"))
            #expect(entries[1]["bytes_out"] as? Int == failed.body.count)
        }
    }

    @Test("access log: a sink that blocks holds no request back; lines past its queue are dropped and counted")
    func accessLogBlockedSink() async throws {
        final class BlockingSink: Sendable {
            let release = DispatchSemaphore(value: 0)
            let written = Atomic<Int>(0)
            /// Blocks on its first line until released, like a pipe nobody reads.
            var sink: AccessLogSink {
                AccessLogSink(capacity: 3) { _ in
                    if self.written.add(1, ordering: .relaxed).newValue == 1 { self.release.wait() }
                }
            }
        }
        let blocking = BlockingSink()
        try await withServer({ $0.accessLog = true; $0.workers = 2 }, accessLog: blocking.sink) { server in
            defer { blocking.release.signal() }
            #expect(try await postJob(server, #"{"op":"multiply","x":1,"y":2}"#).status == 200)
            #expect(try await eventually { blocking.written.load(ordering: .relaxed) == 1 }, "the writer holds the first line")
            // More answers than the queue (3) holds.
            for i in 0..<9 {
                #expect(try await postJob(server, #"{"op":"multiply","x":\#(i),"y":2}"#).status == 200)
            }
            let stats = try await request(server.url("/stats")).json
            let accessLog = try #require(stats["access_log"] as? [String: Any], "\(stats)")
            #expect(accessLog["queued"] as? Int == 3)
            #expect(accessLog["dropped"] as? Int == 6)
            let metrics = try await request(server.url("/metrics")).text
            #expect(prometheusSample(metrics, "balancer_access_log_dropped_total") == 7, "the /stats line was dropped too")
        }
        // Released, the writer wrote the queued lines before the server stopped.
        #expect(blocking.written.load(ordering: .relaxed) == 4)
    }

    @Test("access log: the queue keeps the lines' order and writes them all at shutdown")
    func accessLogQueueFlushes() async throws {
        let log = CapturedAccessLog()
        let queue = AccessLogQueue(log.sink)
        for i in 0..<100 { queue.write(ByteBuffer(string: "{\"n\":\(i)}\n")) }
        await queue.finish(within: .seconds(30))
        #expect(log.lines == (0..<100).map { "{\"n\":\($0)}\n" })
        queue.write(ByteBuffer(string: "late\n"))
        #expect(queue.dropped == 1 && log.lines.count == 100, "a line after finish is dropped")
    }

    @Test("access log off (the default): nothing is written")
    func accessLogOff() async throws {
        let log = CapturedAccessLog()
        try await withServer(accessLog: log.sink) { server in
            let answer = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
            #expect(answer.status == 200)
            #expect(log.lines.isEmpty)
        }
    }
}

@Suite("Observability end to end: the built balancer serve", .serialized, .enabled(if: balancerBinary != nil))
struct ObservabilityEndToEndTests {
    @Test("--access-log writes one JSON line per request to stdout, the service's logs stay on stderr")
    func accessLogOnStandardOutput() async throws {
        let server = try ServeProcess(["--port", "0", "--workers", "2", "--access-log"])
        defer { server.stop() }
        try await server.start()
        let answer = try await request(
            server.url("/jobs"), method: "POST", body: #"{"op":"multiply","x":6,"y":7}"#, headers: ["X-Request-Id": "e2e-1"])
        #expect(answer.status == 200)
        #expect(try await request(server.url("/nope")).status == 404)
        #expect(try await eventually { server.output.split(separator: "\n").count == 2 })
        let lines = server.output.split(separator: "\n")
        let first = try #require(try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any])
        #expect(first["request_id"] as? String == "e2e-1")
        #expect(first["status"] as? Int == 200)
        #expect(first["path"] as? String == "/jobs")
        let second = try #require(try JSONSerialization.jsonObject(with: Data(lines[1].utf8)) as? [String: Any])
        #expect(second["status"] as? Int == 404)
        #expect(!server.log.contains("request_id"), "access-log lines do not go to stderr")
        #expect(server.log.contains("listening"))
        kill(server.process.processIdentifier, SIGTERM)
        #expect(try await server.waitForExit() == 0)
    }

    @Test("--no-metrics: /metrics is 404; BALANCER_METRICS=false too")
    func noMetricsFlag() async throws {
        for (arguments, environment) in [(["--no-metrics"], [:]), ([], ["BALANCER_METRICS": "false"])] {
            let server = try ServeProcess(["--port", "0"] + arguments, environment: environment)
            defer { server.stop() }
            try await server.start()
            #expect(try await request(server.url("/metrics")).status == 404)
            kill(server.process.processIdentifier, SIGTERM)
            #expect(try await server.waitForExit() == 0)
        }
    }
}

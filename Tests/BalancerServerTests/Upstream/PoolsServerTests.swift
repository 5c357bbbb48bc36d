import BalancerCore
import Foundation
import NIOCore
import Synchronization
import Testing

@testable import BalancerServer

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Clients that request `path` in a loop, each on its own keep-alive
/// connection, until ``stop()``; every status is kept.
final class Load: Sendable {
    private final class Shared: Sendable {
        let statuses = Mutex<[Int]>([])
        let failures = Mutex<[String]>([])
        let running = Atomic<Bool>(true)
    }

    private let shared = Shared()
    private let task: Task<Void, Never>

    init(_ url: URL, clients: Int) {
        let shared = self.shared
        task = Task {
            await withTaskGroup(of: Void.self) { group in
                for _ in 0..<clients {
                    group.addTask {
                        while shared.running.load(ordering: .relaxed) {
                            do {
                                let status = try await request(url).status
                                shared.statuses.withLock { $0.append(status) }
                            } catch {
                                shared.failures.withLock { $0.append("\(error)") }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Requests answered so far.
    var count: Int { shared.statuses.withLock { $0.count } }

    /// Stops the clients and returns every status and client-side failure.
    func stop() async -> (statuses: [Int], failures: [String]) {
        shared.running.store(false, ordering: .relaxed)
        await task.value
        return (shared.statuses.withLock { $0 }, shared.failures.withLock { $0 })
    }

    /// Waits until `more` further requests have been answered.
    func wait(forMore more: Int) async throws {
        let target = count + more
        #expect(try await eventually(timeout: .seconds(20)) { self.count >= target }, "load stalled at \(count)")
    }
}

extension UpstreamTestBackend {
    /// Requests received other than health checks.
    var proxied: Int { requestsReceived - healthChecks }
}

/// `GET /admin/backends`, by name.
func adminBackends(_ url: URL) async throws -> [String: [String: any Sendable]] {
    let answer = try await request(url)
    let backends = try #require(try answer.json["backends"] as? [[String: any Sendable]], "\(answer.text)")
    var byName: [String: [String: any Sendable]] = [:]
    for backend in backends { byName[backend["name"] as? String ?? ""] = backend }
    return byName
}

/// Requests per backend name, summed over its workers in `/stats`' pools.
func requestsPerBackend(_ server: TestServer) async throws -> [String: Int] {
    let stats = try await request(server.url("/stats"))
    let pools = try #require(try stats.json["pools"] as? [[String: any Sendable]])
    var counts: [String: Int] = [:]
    for pool in pools {
        for worker in pool["workers"] as? [[String: any Sendable]] ?? [] {
            counts[worker["backend"] as? String ?? "", default: 0] += worker["requests"] as? Int ?? 0
        }
    }
    return counts
}

@Suite("upstream pools: config routes, admin port, admin API, health checks, under load")
struct PoolsServerTests {
    @Test("pools from a config file: the longest route wins, /jobs is still the jobs pool, the rest goes to the default pool")
    func routesFromConfig() async throws {
        let api = try await UpstreamTestBackend.start()
        let web = try await UpstreamTestBackend.start()
        defer { Task { await api.stop(); await web.stop() } }
        let loaded = try ServerConfiguration.load(
            file: ("pools.json", ByteBuffer(string: """
                {"pools": [
                  {"name": "jobs", "kind": "jobs"},
                  {"name": "api", "route": "/api/", "backends": [{"name": "api-a", "url": "http://127.0.0.1:\(api.port)", "connections": 2}]},
                  {"name": "web", "backends": [{"name": "web-a", "url": "http://127.0.0.1:\(web.port)", "connections": 2}]}
                ]}
                """)))
        try await withServer({ $0 = loaded; $0.port = 0 }) { server in
            // The path goes to the backend as it came (no prefix stripping).
            let routed = try await request(server.url("/api/status?code=201"))
            #expect(routed.status == 201 && routed.header("x-connection-id") != nil)
            let fallback = try await request(server.url("/delayed"))
            #expect(fallback.text == "port \(web.port)")
            let notUnderApi = try await request(server.url("/apiwork"))
            #expect(notUnderApi.status == 404 && notUnderApi.header("x-connection-id") != nil, "the web backend's own 404")
            let job = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
            #expect(try job.json["result"] as? Int == 42)
            let stats = try await request(server.url("/stats"))
            let pools = try #require(try stats.json["pools"] as? [[String: any Sendable]])
            #expect(pools.map { $0["name"] as? String } == ["api", "web"])
            #expect(pools.map { $0["route"] as? String } == ["/api/", nil])
            #expect(try await requestsPerBackend(server) == ["api-a": 1, "web-a": 2])
        }
    }

    @Test("with admin_port, admin paths move to their own listener and the main port proxies every path")
    func adminPortSplit() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withServer({
            $0.upstreams = ["http://127.0.0.1:\(backend.port)"]
            $0.connectionsPerUpstream = 2
            $0.adminPort = 0
        }) { server in
            let adminPort = try #require(server.server.adminPort)
            #expect(adminPort != server.port)
            func admin(_ path: String) -> URL { URL(string: "http://127.0.0.1:\(adminPort)\(path)")! }

            // Main port: /stats and /healthz are the backend's.
            let stats = try await request(server.url("/stats"))
            #expect(stats.status == 404)
            #expect(stats.header("x-connection-id") != nil, "answered by the backend")
            let health = try await request(server.url("/healthz"))
            #expect(health.status == 200 && health.header("x-connection-id") != nil)
            let admins = try await request(server.url("/admin/backends"))
            #expect(admins.header("x-connection-id") != nil)
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200, "the jobs pool keeps /jobs")

            // Admin port: the server's own paths, nothing else.
            let received = backend.requestsReceived
            let ownStats = try await request(admin("/stats"))
            #expect(ownStats.status == 200)
            #expect(try ownStats.json["pools"] != nil)
            #expect(try await request(admin("/healthz")).text == "{\"status\":\"ok\"}\n")
            #expect(try await request(admin("/readyz")).status == 200)
            #expect(try await adminBackends(admin("/admin/backends")).keys.sorted() == ["backend1"])
            let work = try await request(admin("/delayed"))
            #expect(work.status == 404 && work.errorCode == "not_found")
            #expect(try await request(admin("/jobs"), method: "POST", body: "{}").status == 404)
            #expect(backend.requestsReceived == received, "nothing on the admin port reaches the backend")
        }
    }

    @Test("a slow backend gets fewer requests than the fast ones (counts from /stats)")
    func slowBackendGetsLess() async throws {
        let fast1 = try await UpstreamTestBackend.start(responseDelay: .milliseconds(1))
        let fast2 = try await UpstreamTestBackend.start(responseDelay: .milliseconds(1))
        let slow = try await UpstreamTestBackend.start(responseDelay: .milliseconds(200))
        defer { Task { await fast1.stop(); await fast2.stop(); await slow.stop() } }
        try await withProxy([fast1.port, fast2.port, slow.port], { $0.connectionsPerUpstream = 2 }) { server, _ in
            let load = Load(server.url("/delayed"), clients: 6)
            try await load.wait(forMore: 300)
            let (statuses, failures) = await load.stop()
            #expect(failures.isEmpty, "\(failures.prefix(3))")
            #expect(statuses.allSatisfy { $0 == 200 })
            let counts = try await requestsPerBackend(server)
            let (a, b, c) = (counts["backend1"] ?? 0, counts["backend2"] ?? 0, counts["backend3"] ?? 0)
            #expect(a + b + c == statuses.count)
            // Each connection takes the next request when it is free, so shares
            // follow throughput; how far apart they are depends on the
            // machine's load (a starved process slows the fast backends too).
            #expect(c < a && c < b, "slow backend3 got \(c), fast ones \(a) and \(b)")
        }
    }

    @Test("drain through the admin API under load: no errors, the drained backend's requests stop, ready brings it back")
    func drainUnderLoad() async throws {
        let first = try await UpstreamTestBackend.start(responseDelay: .milliseconds(5))
        let second = try await UpstreamTestBackend.start(responseDelay: .milliseconds(5))
        defer { Task { await first.stop(); await second.stop() } }
        try await withProxy([first.port, second.port], { $0.connectionsPerUpstream = 2 }) { server, _ in
            let load = Load(server.url("/delayed"), clients: 6)
            try await load.wait(forMore: 50)
            #expect(first.proxied > 0)

            let drained = try await request(server.url("/admin/backends/backend1/drain"), method: "POST")
            #expect(drained.status == 200)
            #expect(["draining", "drained"].contains(try drained.json["state"] as? String ?? ""), "\(drained.text)")
            #expect(try await eventually {
                try await adminBackends(server.url("/admin/backends"))["backend1"]?["state"] as? String == "drained"
            })
            let servedWhenDrained = first.proxied
            try await load.wait(forMore: 100)
            #expect(first.proxied == servedWhenDrained, "a drained backend takes no new requests")
            let stats = try await request(server.url("/stats"))
            let workers = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first?["workers"] as? [[String: any Sendable]])
            #expect(workers.filter { $0["backend"] as? String == "backend1" }.allSatisfy { $0["state"] as? String == "drained" })

            let ready = try await request(server.url("/admin/backends/backend1/ready"), method: "POST")
            #expect(ready.status == 200)
            #expect(try await eventually { first.proxied > servedWhenDrained }, "ready puts it back in rotation")
            let (statuses, failures) = await load.stop()
            #expect(failures.isEmpty, "\(failures.prefix(3))")
            #expect(statuses.allSatisfy { $0 == 200 }, "\(statuses.filter { $0 != 200 })")
        }
    }

    @Test("add and remove backends through the admin API under load, with no errors")
    func addAndRemoveUnderLoad() async throws {
        let first = try await UpstreamTestBackend.start(responseDelay: .milliseconds(5))
        let second = try await UpstreamTestBackend.start(responseDelay: .milliseconds(5))
        defer { Task { await first.stop(); await second.stop() } }
        try await withProxy([first.port], { $0.connectionsPerUpstream = 2 }) { server, _ in
            let load = Load(server.url("/delayed"), clients: 6)
            try await load.wait(forMore: 30)

            let added = try await request(
                server.url("/admin/backends"), method: "POST",
                body: #"{"pool": "upstream", "name": "extra", "url": "http://127.0.0.1:\#(second.port)", "connections": 3}"#)
            #expect(added.status == 201, "\(added.text)")
            #expect(try added.json["connections"] as? Int == 3)
            #expect(try await eventually { second.proxied > 10 }, "the new backend's workers joined the heap")

            let removed = try await request(server.url("/admin/backends/backend1"), method: "DELETE")
            #expect(removed.status == 202, "\(removed.text)")
            #expect(try removed.json["state"] as? String == "removing")
            #expect(try await eventually { try await adminBackends(server.url("/admin/backends"))["backend1"] == nil })
            let servedWhenRemoved = first.proxied
            try await load.wait(forMore: 100)
            #expect(first.proxied == servedWhenRemoved)

            let (statuses, failures) = await load.stop()
            #expect(failures.isEmpty, "\(failures.prefix(3))")
            #expect(statuses.allSatisfy { $0 == 200 }, "\(statuses.filter { $0 != 200 })")
            let stats = try await request(server.url("/stats"))
            let pool = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first)
            let workers = try #require(pool["workers"] as? [[String: any Sendable]])
            #expect(workers.count == 3 && workers.allSatisfy { $0["backend"] as? String == "extra" })
            #expect(try await request(server.url("/delayed")).text == "port \(second.port)")
        }
    }

    @Test("admin API errors: 404 unknown backend or pool, 409 name taken, 400 bad body, 405 wrong method")
    func adminErrors() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port]) { server, _ in
            let cases: [(String, String, String?, Int, String)] = [
                ("POST", "/admin/backends/nope/drain", nil, 404, "unknown_backend"),
                ("DELETE", "/admin/backends/nope", nil, 404, "unknown_backend"),
                ("GET", "/admin/backends/nope", nil, 404, "unknown_backend"),
                ("POST", "/admin/backends", #"{"name":"backend1","url":"http://127.0.0.1:1"}"#, 409, "backend_exists"),
                ("POST", "/admin/backends", #"{"pool":"nope","url":"http://127.0.0.1:1"}"#, 404, "unknown_pool"),
                ("POST", "/admin/backends", #"{"name":"x"}"#, 400, "bad_field"),
                ("POST", "/admin/backends", #"{"name":"x","url":"ftp://h"}"#, 400, "bad_field"),
                ("POST", "/admin/backends", #"{"name":"x","url":"http://h:1","connections":0}"#, 400, "bad_field"),
                ("POST", "/admin/backends", #"{"name":"x","url":"http://h:1","colour":1}"#, 400, "bad_field"),
                ("POST", "/admin/backends", "{", 400, "bad_json"),
                ("PUT", "/admin/backends", "{}", 405, "method_not_allowed"),
                ("GET", "/admin/backends/backend1/drain", nil, 405, "method_not_allowed"),
                ("POST", "/admin/backends/backend1", nil, 405, "method_not_allowed"),
                ("GET", "/admin/other", nil, 404, "not_found"),
            ]
            for (method, path, body, status, code) in cases {
                let answer = try await request(server.url(path), method: method, body: body)
                #expect(answer.status == status, "\(method) \(path): \(answer.text)")
                #expect(answer.errorCode == code, "\(method) \(path): \(answer.text)")
            }
            #expect(try await request(server.url("/admin/backends"), method: "PUT", body: "{}").header("allow") == "GET, POST")
            let one = try await request(server.url("/admin/backends/backend1"))
            #expect(try one.json["state"] as? String == "ready")
            #expect(try await request(server.url("/admin/backends/backend1"), method: "DELETE").status == 202)
            let again = try await request(server.url("/admin/backends/backend1/drain"), method: "POST")
            #expect([404, 409].contains(again.status), "removing or gone: \(again.text)")
        }
    }

    @Test("active health checks take a failing backend out and bring it back; /stats shows the last check")
    func activeHealthChecks() async throws {
        let first = try await UpstreamTestBackend.start()
        let second = try await UpstreamTestBackend.start()
        defer { Task { await first.stop(); await second.stop() } }
        let loaded = try ServerConfiguration.load(
            file: ("pools.json", ByteBuffer(string: """
                {"pools": [{"name": "app", "backends": [
                    {"name": "one", "url": "http://127.0.0.1:\(first.port)", "connections": 2},
                    {"name": "two", "url": "http://127.0.0.1:\(second.port)", "connections": 2}],
                  "health": {"path": "/healthz", "interval_ms": 50, "timeout_ms": 3000, "rise": 2, "fall": 2}}]}
                """)))
        try await withServer({ $0 = loaded; $0.port = 0 }) { server in
            func state(_ name: String) async throws -> String? {
                try await adminBackends(server.url("/admin/backends"))[name]?["state"] as? String
            }
            #expect(try await eventually { first.healthChecks >= 2 && second.healthChecks >= 2 })
            #expect(try await state("one") == "ready")

            first.isHealthy = false
            #expect(try await eventually { try await state("one") == "down" })
            let servedWhenDown = first.proxied
            for _ in 0..<20 {
                let answer = try await request(server.url("/delayed"))
                #expect(answer.status == 200 && answer.text == "port \(second.port)")
            }
            #expect(first.proxied == servedWhenDown)
            let stats = try await request(server.url("/stats"))
            let workers = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first?["workers"] as? [[String: any Sendable]])
            let down = try #require(workers.first { $0["backend"] as? String == "one" })
            #expect(down["state"] as? String == "down")
            let health = try #require(down["health"] as? [String: any Sendable])
            #expect(health["state"] as? String == "down")
            let last = try #require(health["last_check"] as? [String: any Sendable])
            #expect(last["status"] as? Int == 503)
            #expect(last["result"] as? String == "status 503")
            #expect((last["age_ms"] as? Int).map { $0 >= 0 } == true)

            first.isHealthy = true
            #expect(try await eventually { try await state("one") == "ready" })
            #expect(try await eventually {
                _ = try await request(server.url("/delayed"))
                return first.proxied > servedWhenDown
            })
        }
    }

    @Test("passive ejection wins over passing health checks until its cool-down ends")
    func ejectionWinsOverPassingChecks() async throws {
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        let loaded = try ServerConfiguration.load(
            file: ("pools.json", ByteBuffer(string: """
                {"pools": [{"name": "app", "backends": [{"name": "one", "url": "http://127.0.0.1:\(backend.port)", "connections": 2}],
                  "health": {"path": "/healthz", "interval_ms": 50, "timeout_ms": 3000, "rise": 1, "fall": 10},
                  "max_fails": 1, "fail_timeout_ms": 1500, "response_timeout_ms": 200, "retries": 0}]}
                """)))
        try await withServer({ $0 = loaded; $0.port = 0 }) { server in
            let hung = try await request(server.url("/hang"))
            #expect(hung.status == 504)
            let one = try #require(try await adminBackends(server.url("/admin/backends"))["one"])
            #expect(one["state"] as? String == "down")
            #expect(one["ejected"] as? Bool == true)
            #expect((one["health"] as? [String: any Sendable])?["state"] as? String == "up", "checks pass all along")
            let refused = try await request(server.url("/status?code=200"))
            #expect(refused.status == 503 && refused.header("x-connection-id") == nil, "no backend in rotation")
            #expect(try await eventually {
                try await adminBackends(server.url("/admin/backends"))["one"]?["state"] as? String == "ready"
            }, "back when the cool-down ends")
            #expect(try await request(server.url("/status?code=200")).status == 200)
        }
    }

}

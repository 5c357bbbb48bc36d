import BalancerCore
import Foundation
import NIOCore
import Testing

@testable import BalancerServer

@Suite("Configuration: pools, routes, admin port")
struct PoolConfigurationTests {
    private func file(_ text: String) -> (path: String, contents: ByteBuffer) {
        ("test.json", ByteBuffer(string: text))
    }

    /// The repository's example file, found from this source file's place.
    static func exampleFile(_ name: String) throws -> (path: String, contents: ByteBuffer) {
        let url = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("config").appendingPathComponent(name)
        return (url.path, ByteBuffer(bytes: try Data(contentsOf: url)))
    }

    @Test("config/upstream-pools.json loads: three pools, routes, backends, health, admin port")
    func exampleLoads() throws {
        let configuration = try ServerConfiguration.load(file: try Self.exampleFile("upstream-pools.json"))
        #expect(configuration.adminPort == 8081)
        let pools = configuration.effectivePools
        #expect(pools.map(\.name) == ["jobs", "api", "web"])
        #expect(pools.map(\.kind) == [.jobs, .upstream, .upstream])
        #expect(pools.map(\.effectiveRoute) == ["/jobs", "/api/", nil])
        let api = pools[1]
        #expect(api.backends == [
            BackendConfiguration(name: "api-a", url: "http://127.0.0.1:9001", connections: 16),
            BackendConfiguration(name: "api-b", url: "http://127.0.0.1:9002", connections: 16),
        ])
        let health = try #require(api.health)
        #expect(health.path == "/healthz")
        #expect(health.intervalMilliseconds == 2_000)
        #expect(health.timeoutMilliseconds == 1_000)
        #expect((health.rise, health.fall) == (2, 3))
        #expect(api.retries == 2 && api.maxFails == 1 && api.failTimeoutMilliseconds == 10_000)
        #expect(pools[2].strategy == .peakEWMA)
        #expect(pools[2].health == nil)
        #expect(pools[2].backends[0].connections == 8)
    }

    @Test("without pools, the quick start is the jobs pool and one default upstream pool")
    func quickStart() throws {
        let configuration = try ServerConfiguration.load(
            flags: ["upstreams": "http://127.0.0.1:9001,http://127.0.0.1:9002", "connections_per_upstream": "3", "strategy": "peak-ewma"],
            environment: ["BALANCER_UPSTREAM_RETRIES": "1"]
        )
        let pools = configuration.effectivePools
        #expect(pools.map(\.name) == ["jobs", "upstream"])
        #expect(pools[1].route == nil)
        #expect(pools[1].backends.map(\.name) == ["backend1", "backend2"])
        #expect(pools[1].backends.map(\.connections) == [3, 3])
        #expect(pools[1].retries == 1)
        #expect(pools[1].strategy == .peakEWMA)
        #expect(try ServerConfiguration.load().effectivePools.map(\.kind) == [.jobs])
    }

    @Test("pools and admin_port come from the environment and flags too")
    func layers() throws {
        let pools = #"[{"name":"p","backends":[{"url":"http://127.0.0.1:9001"}]}]"#
        let fromEnvironment = try ServerConfiguration.load(environment: ["BALANCER_POOLS": pools, "BALANCER_ADMIN_PORT": "9100"])
        #expect(fromEnvironment.pools.map(\.name) == ["p"])
        #expect(fromEnvironment.pools[0].backends[0].name == "127.0.0.1:9001", "a backend without a name is host:port")
        #expect(fromEnvironment.pools[0].backends[0].connections == 16)
        #expect(fromEnvironment.adminPort == 9100)
        let fromFlags = try ServerConfiguration.load(flags: ["pools": pools, "admin_port": "9101"])
        #expect(fromFlags.pools == fromEnvironment.pools)
        #expect(fromFlags.adminPort == 9101)
        #expect(try ServerConfiguration.load().adminPort == nil)
    }

    @Test("the printed configuration with pools loads back to the same values")
    func roundTrip() throws {
        let loaded = try ServerConfiguration.load(file: try Self.exampleFile("upstream-pools.json"))
        #expect(try ServerConfiguration.load(file: file(loaded.prettyJSON)) == loaded)
        let plain = try ServerConfiguration.load()
        #expect(try ServerConfiguration.load(file: file(plain.prettyJSON)) == plain)
    }

    static let backend = #"{"name":"a","url":"http://127.0.0.1:9001"}"#

    @Test("bad pools are refused at start-up with one message naming the problem", arguments: [
        (#"{"pools": {}}"#, "pools: must be an array"),
        (#"{"pools": [{"name":"p","backends":[\#(backend)],"retires":1}]}"#, #"pools[0]: unknown key "retires""#),
        (#"{"pools": [{"backends":[\#(backend)]}]}"#, #"pools[0]: "name" is missing"#),
        (#"{"pools": [{"name":"p","backends":[]}]}"#, "pools[0]: an upstream pool needs at least one backend"),
        (#"{"pools": [{"name":"p","kind":"lambda","backends":[\#(backend)]}]}"#, "pools[0].kind"),
        (#"{"pools": [{"name":"p","backends":[{"url":"https://x:1"}]}]}"#, "pools[0].backends[0].url: invalid backend URL"),
        (#"{"pools": [{"name":"p","backends":[{"url":"http://x:1","connections":0}]}]}"#, "pools[0].backends[0].connections: 0 is out of range"),
        (#"{"pools": [{"name":"p","backends":[{"name":"a"}]}]}"#, #"pools[0].backends[0]: "url" is missing"#),
        (#"{"pools": [{"name":"p","route":"api","backends":[\#(backend)]}]}"#, "pools[0].route"),
        (#"{"pools": [{"name":"p","backends":[\#(backend)],"health":{"path":"/h","every":1}}]}"#, #"pools[0].health: unknown key "every""#),
        (#"{"pools": [{"name":"p","backends":[\#(backend)],"health":{"rise":0}}]}"#, "pools[0].health.rise"),
        (#"{"pools": [{"name":"p","backends":[\#(backend)],"strategy":"random"}]}"#, "pools[0].strategy"),
        (#"{"pools": [{"name":"j","kind":"jobs","route":"/work"}]}"#, "a jobs pool serves /jobs"),
        (#"{"pools": [{"name":"j","kind":"jobs","backends":[\#(backend)]}]}"#, "a jobs pool has no backends"),
        (#"{"pools": [{"name":"p","backends":[\#(backend)]},{"name":"p","route":"/x","backends":[{"url":"http://127.0.0.1:2"}]}]}"#, #"two pools are named "p""#),
        (#"{"pools": [{"name":"p","route":"/x","backends":[\#(backend)]},{"name":"q","route":"/x","backends":[{"url":"http://127.0.0.1:2"}]}]}"#, #""p" and "q" both have route "/x""#),
        (#"{"pools": [{"name":"p","backends":[\#(backend)]},{"name":"q","backends":[{"url":"http://127.0.0.1:2"}]}]}"#, "both have no route"),
        (#"{"pools": [{"name":"p","backends":[\#(backend)]},{"name":"q","route":"/q","backends":[\#(backend)]}]}"#, #"backend name "a" is used twice"#),
        (#"{"pools": [{"name":"j","kind":"jobs"},{"name":"k","kind":"jobs"}]}"#, "both have route \"/jobs\""),
        (#"{"pools": [{"name":"server","backends":[\#(backend)]}]}"#, #"may not be named "server""#),
        (#"{"upstreams": ["http://127.0.0.1:1"], "pools": [{"name":"p","backends":[\#(backend)]}]}"#, "upstreams and pools"),
        (#"{"port": 9000, "admin_port": 9000}"#, "admin_port: 9000 is also the main port"),
        (#"{"admin_port": "x"}"#, "admin_port"),
    ] as [(String, String)])
    func refused(text: String, message: String) {
        do {
            _ = try ServerConfiguration.load(file: file(text))
            Issue.record("expected an error containing \(message)")
        } catch {
            #expect(error.message.contains(message), "\(error.message)")
            #expect(!error.message.contains("\n"), "one line")
        }
    }

    @Test("BALANCER_POOLS that is not JSON names the variable")
    func badEnvironmentJSON() {
        #expect(throws: ConfigurationError.self) { try ServerConfiguration.load(environment: ["BALANCER_POOLS": "[{"]) }
        do {
            _ = try ServerConfiguration.load(environment: ["BALANCER_POOLS": "[{"])
        } catch {
            #expect(error.message.hasPrefix("BALANCER_POOLS: not valid JSON"), "\(error.message)")
        }
    }

    @Test("routes: longest prefix wins, /jobs stays the jobs pool's, the pool without a route takes the rest")
    func routing() throws {
        let configuration = try ServerConfiguration.load(file: file(#"""
            {"pools": [
              {"name": "jobs", "kind": "jobs"},
              {"name": "api", "route": "/api/", "backends": [{"name": "a", "url": "http://127.0.0.1:9001"}]},
              {"name": "v2", "route": "/api/v2/", "backends": [{"name": "b", "url": "http://127.0.0.1:9002"}]},
              {"name": "web", "backends": [{"name": "c", "url": "http://127.0.0.1:9003"}]}
            ]}
            """#))
        let upstreams = try UpstreamPool.pools(of: configuration, eventLoopGroup: .singletonMultiThreadedEventLoopGroup)
        func target(_ uri: String, _ routes: Routes, on listener: Routes.Listener = .main) -> String {
            switch routes.target(for: uri, on: listener) {
            case .admin: "admin"
            case .jobs: "jobs"
            case .upstream(let pool): pool.name
            case .notFound: "404"
            }
        }
        let shared = Routes(pools: configuration.effectivePools, upstreams: upstreams, adminOnMain: true)
        #expect(target("/api/v2/users?x=1", shared) == "v2")
        #expect(target("/api/v1/users", shared) == "api")
        #expect(target("/api", shared) == "web", "a plain prefix: /api/ does not match /api")
        #expect(target("/jobs", shared) == "jobs")
        #expect(target("/", shared) == "web")
        #expect(target("/stats?format=text", shared) == "admin")
        #expect(target("/admin/backends", shared) == "admin")
        #expect(target("/healthz", shared, on: .admin) == "admin")

        let split = Routes(pools: configuration.effectivePools, upstreams: upstreams, adminOnMain: false)
        #expect(target("/stats", split) == "web", "with an admin port the main port proxies every path")
        #expect(target("/admin/backends", split) == "web")
        #expect(target("/jobs", split) == "jobs")
        #expect(target("/stats", split, on: .admin) == "admin")
        #expect(target("/api/v2/x", split, on: .admin) == "404")

        let noFallback = try ServerConfiguration.load(file: file(#"{"pools": [{"name": "api", "route": "/api/", "backends": [{"url": "http://127.0.0.1:9001"}]}]}"#))
        let routes = Routes(
            pools: noFallback.effectivePools,
            upstreams: try UpstreamPool.pools(of: noFallback, eventLoopGroup: .singletonMultiThreadedEventLoopGroup),
            adminOnMain: true)
        #expect(target("/jobs", routes) == "404", "without a jobs pool, /jobs is not served")
        #expect(target("/other", routes) == "404")
    }
}

@Suite("Upstream pools: the rotation rule")
struct RotationRuleTests {
    @Test("a backend is in rotation only while the admin API, active checks and passive health all agree")
    func anyNoWins() throws {
        let now = ContinuousClock.now
        var ejected = PassiveHealth(maxFailures: 1, coolDown: .seconds(10))
        let ejects = ejected.recordFailure(now: now)
        #expect(ejects)
        for admin in [UpstreamPool.AdminState.ready, .draining, .removing] {
            for healthUp in [true, false] {
                for passive in [PassiveHealth(maxFailures: 1, coolDown: .seconds(10)), ejected] {
                    var entry = UpstreamPool.BackendEntry(
                        backend: try Backend(name: "b", url: "http://127.0.0.1:1"), number: 0, connections: 1, workerIDs: [0],
                        passive: passive)
                    entry.admin = admin
                    entry.healthUp = healthUp
                    let expected = admin == .ready && healthUp && !passive.isEjected(now: now)
                    #expect(entry.inRotation(now: now) == expected, "\(admin) up \(healthUp) ejected \(passive.isEjected(now: now))")
                }
            }
        }
        // The ejection ends by itself: checks passing, the backend comes back.
        let entry = UpstreamPool.BackendEntry(
            backend: try Backend(name: "b", url: "http://127.0.0.1:1"), number: 0, connections: 1, workerIDs: [0], passive: ejected)
        #expect(!entry.inRotation(now: now + .seconds(9)))
        #expect(entry.inRotation(now: now + .seconds(10)))
    }
}

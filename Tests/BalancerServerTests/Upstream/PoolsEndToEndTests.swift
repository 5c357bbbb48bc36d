import Foundation
import NIOCore
import NIOPosix
import Testing

/// A port nobody listens on now (bound, read, closed): for a fixed `--admin-port`.
func freePort() async throws -> Int {
    let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .bind(host: "127.0.0.1", port: 0).get()
    let port = try #require(channel.localAddress?.port)
    try await channel.close()
    return port
}

@Suite("End to end: pools, routes and the admin port in the built balancer serve")
struct PoolsEndToEndTests {
    @Test("bad pools stop start-up with one line naming the problem and exit status 2")
    func badPools() async throws {
        let backend = #"{"url":"http://127.0.0.1:9001"}"#
        let sameRoute = #"[{"name":"a","route":"/x","backends":[\#(backend)]},{"name":"b","route":"/x","backends":[{"url":"http://127.0.0.1:9002"}]}]"#
        let cases: [([String], [String: String], String)] = [
            (["serve", "--pools", sameRoute], [:], #""a" and "b" both have route "/x""#),
            (["serve"], ["BALANCER_POOLS": "[{"], "BALANCER_POOLS: not valid JSON"),
            (["serve", "--pools", #"[{"name":"a","backends":[{"url":"https://x"}]}]"#], [:], "invalid backend URL 'https://x'"),
            (["serve", "--pools", #"[{"name":"a","backends":[\#(backend)],"helth":{}}]"#], [:], #"unknown key "helth""#),
            (["serve", "--upstream", "http://127.0.0.1:9001", "--pools", #"[{"name":"a","backends":[\#(backend)]}]"#], [:], "upstreams and pools"),
            (["serve", "--port", "9000", "--admin-port", "9000"], [:], "admin_port: 9000 is also the main port"),
        ]
        for (arguments, environment, message) in cases {
            let (status, output) = try await runBalancer(arguments, environment: environment)
            #expect(status == 2, "\(arguments): \(output)")
            #expect(output.split(separator: "\n").count == 1, "one line: \(output)")
            #expect(output.contains(message), "\(output)")
        }
    }

    @Test("config/upstream-pools.json loads and prints back")
    func exampleFile() async throws {
        let file = try PoolConfigurationTests.exampleFile("upstream-pools.json")
        let (status, output) = try await runBalancer(["serve", "--print-config", "--config", file.path])
        #expect(status == 0, "\(output)")
        #expect(output.contains(#""admin_port": 8081"#))
        #expect(output.contains(#""route":"/api/""#))
        #expect(output.contains(#""health":{"path":"/healthz","interval_ms":2000,"timeout_ms":1000,"rise":2,"fall":3}"#))
    }

    @Test("with --admin-port, /healthz is on the admin port, and balancer healthcheck finds it there")
    func adminPortHealthcheck() async throws {
        let adminPort = try await freePort()
        let server = try ServeProcess(["--port", "0", "--admin-port", String(adminPort)])
        defer { server.stop() }
        try await server.start()
        #expect(server.log.contains("admin_address=127.0.0.1:\(adminPort)"), "\(server.log)")
        let (healthy, output) = try await runBalancer(["healthcheck"], environment: ["BALANCER_ADMIN_PORT": String(adminPort)])
        #expect(healthy == 0, "\(output)")
        let (onMain, _) = try await runBalancer(["healthcheck", "--port", String(server.port)])
        #expect(onMain == 1, "the main port has no /healthz of its own (and no pool takes it)")
        kill(server.process.processIdentifier, SIGTERM)
        #expect(try await server.waitForExit() == 0)
    }
}

import BalancerCore
import BalancerServer
import Foundation
import Testing

/// `balancer job` and `balancer stats`, the built binary against an in-process server.
@Suite("balancer job and balancer stats", .serialized, .enabled(if: balancerBinary != nil))
struct CommandLineClientTests {
    @Test("job posts key=value fields, typed as JSON where they parse, and prints the answer")
    func job() async throws {
        try await withServer { server in
            let url = "http://127.0.0.1:\(server.port)"
            let (status, output) = try await runBalancer(["job", "multiply", "x=6", "y=7", "--url", url])
            #expect(status == 0, "\(output)")
            #expect(output.hasPrefix("result 42  worker "), "\(output)")
            #expect(output.contains(" µs  run ") && output.hasSuffix(" µs\n"), "\(output)")

            let (echoStatus, echoed) = try await runBalancer([
                "job", "echo", #"value={"a":[1,true,null]}"#, "timeout_ms=5000", "--json", "--url", url,
            ])
            #expect(echoStatus == 0, "\(echoed)")
            let answer = try #require(try JSONSerialization.jsonObject(with: Data(echoed.utf8)) as? [String: Any])
            #expect(answer["op"] as? String == "echo")
            let result = try #require(answer["result"] as? [String: Any])
            #expect((result["a"] as? [Any])?.count == 3)

            let (_, text) = try await runBalancer(["job", "echo", "value=6 x 7", "--url", url])
            #expect(text.hasPrefix(#"result "6 x 7""#), "\(text)")
            let (_, number) = try await runBalancer(["job", "echo", "value=-1.5e3", "--url", url])
            #expect(number.hasPrefix("result -1.5e3 "), "\(number)")
        }
    }

    @Test("job errors: the server's message and exit 1; bad arguments are usage errors")
    func jobErrors() async throws {
        try await withServer { server in
            let url = "http://127.0.0.1:\(server.port)"
            let (status, output) = try await runBalancer(["job", "multiply", "x=6", "--url", url])
            #expect(status == 1)
            #expect(output == "balancer job: bad_field: field \"y\" is missing; an integer is required\n")
            let (unknown, unknownOutput) = try await runBalancer(["job", "divide", "--url", url])
            #expect(unknown == 1 && unknownOutput.contains("unknown_op"), "\(unknownOutput)")
            let (usage, usageOutput) = try await runBalancer(["job", "multiply", "x6", "--url", url])
            #expect(usage == 64 && usageOutput.contains("'x6' is not key=value"), "\(usageOutput)")
            for timeout in ["0", "-5"] {
                let (status, output) = try await runBalancer(["job", "multiply", "x=1", "y=2", "--url", url, "--timeout-ms=\(timeout)"])
                #expect(status == 64 && output.contains("--timeout-ms must be positive"), "\(output)")
            }
            // Longer than a Duration's nanoseconds fit in an Int64: waits "forever", does not trap.
            let (huge, hugeOutput) = try await runBalancer(["job", "multiply", "x=1", "y=2", "--url", url, "--timeout-ms", "10000000000000"])
            #expect(huge == 0 && hugeOutput.hasPrefix("result 2  worker "), "\(hugeOutput)")
        }
        let (badURL, badURLOutput) = try await runBalancer(["job", "multiply", "--url", "https://127.0.0.1"])
        #expect(badURL == 64 && badURLOutput.contains("--url: https is not supported"), "\(badURLOutput)")
        // Nothing listens on port 1.
        let (refused, refusedOutput) = try await runBalancer(["job", "multiply", "--url", "http://127.0.0.1:1"])
        #expect(refused == 1 && refusedOutput.contains("connect_failed"), "\(refusedOutput)")
    }

    @Test("stats: a line per worker with a bar scaled to capacity, the pool summary, raw JSON with --json")
    func stats() async throws {
        try await withServer({ $0.workers = 3; $0.capacity = 4; $0.maxJobMilliseconds = 60_000 }) { server in
            let url = "http://127.0.0.1:\(server.port)"
            // Six long sleeps: least-loaded gives each worker two. They outlast any slow run of
            // the binary; cancelled at the end, their clients leave and the jobs end.
            let sleeps = (0..<6).map { _ in
                Task { try await postJob(server, #"{"op":"sleep","ms":60000}"#) }
            }
            defer { sleeps.forEach { $0.cancel() } }
            #expect(try await eventually { await server.balancer.stats().inFlight == 6 })

            let (status, output) = try await runBalancer(["stats", "--url", url])
            #expect(status == 0, "\(output)")
            let lines = output.split(separator: "\n").map(String.init)
            #expect(lines.first?.hasPrefix("\(url)  least-loaded  capacity 4  uptime ") == true, "\(output)")
            for id in 0..<3 {
                let line = try #require(lines.first { $0.hasPrefix("     \(id)  active  ") }, "\(output)")
                // 2 of 4: half of the 20 cells.
                #expect(line.contains("  2 " + String(repeating: "█", count: 10) + String(repeating: "·", count: 10)), "\(line)")
            }
            #expect(lines.contains { $0.hasPrefix("backlog 0/1024  overloaded 0  timed_out 0") }, "\(output)")
            #expect(lines.contains { $0.hasPrefix("totals  submitted 6  completed 0  failed 0  cancelled 0  in_flight 6") }, "\(output)")
            #expect(lines.contains("pending mean 2.00  variance 0.00"), "\(output)")

            let (jsonStatus, json) = try await runBalancer(["stats", "--json", "--url", url])
            #expect(jsonStatus == 0)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
            #expect((object["workers"] as? [Any])?.count == 3)
        }
    }

    @Test("stats shows the upstream pool's workers, one line each with its backend")
    func upstreamStats() async throws {
        let backend = try await UpstreamTestBackend.start()
        try await withServer({
            $0.upstreams = ["http://127.0.0.1:\(backend.port)"]
            $0.connectionsPerUpstream = 2
        }) { server in
            let proxied = try await request(server.url("/status?code=503"))
            #expect(proxied.status == 503)
            let (status, output) = try await runBalancer(["stats", "--url", "http://127.0.0.1:\(server.port)"])
            #expect(status == 0, "\(output)")
            let lines = output.split(separator: "\n").map(String.init)
            let start = try #require(lines.firstIndex(of: "pool upstream  least-loaded"), "\(output)")
            let workers = lines[start...].filter { $0.hasPrefix("     0  backend1  ") || $0.hasPrefix("     1  backend1  ") }
            #expect(workers.count == 2, "\(output)")
            // One request, answered 503: requests 1, 5xx 1 on the worker that took it.
            let fields = workers.map { $0.split(separator: " ").suffix(5).map(String.init) }
            #expect(fields.filter { $0 == ["1", "0", "0", "1", "0"] }.count == 1, "\(output)")
            #expect(fields.filter { $0 == ["0", "0", "0", "0", "0"] }.count == 1, "\(output)")
        }
        await backend.stop()
    }

    @Test("stats --watch: plain snapshots when not a terminal, redrawn in place on one, cursor restored on SIGINT")
    func watch() async throws {
        let binary = try #require(balancerBinary)
        try await withServer { server in
            let url = "http://127.0.0.1:\(server.port)"
            let marker = "\(url)  least-loaded"
            let plain = try await watchUntilTwoSnapshots(binary, ["stats", "--watch", "--interval-ms", "200", "--url", url], marker: marker)
            #expect(plain.components(separatedBy: marker).count - 1 >= 2, "\(plain)")
            #expect(!plain.contains("\u{1B}"), "\(plain)")

            let script = URL(fileURLWithPath: "/usr/bin/script")
            guard FileManager.default.isExecutableFile(atPath: script.path) else { return }
            // `exec`: the shell script starts becomes the balancer, which gets the SIGINT.
            let command = "exec \(binary.path) stats --watch --interval-ms 200 --url \(url)"
            let screen = try await watchUntilTwoSnapshots(script, ["-qfc", command, "/dev/null"], marker: "\u{1B}[H\(marker)", inChild: true)
            #expect(screen.hasPrefix("\u{1B}[?25l\u{1B}[2J\u{1B}[H"), "\(screen.debugDescription)")
            #expect(screen.components(separatedBy: "\u{1B}[H\(marker)").count - 1 >= 2, "\(screen.debugDescription)")
            #expect(screen.hasSuffix("\u{1B}[?25h"), "\(screen.debugDescription)")
        }
    }

    /// Runs `executable` until its output shows `marker` twice (two snapshots;
    /// waiting up to 30 s, however slowly the machine starts it), then sends
    /// SIGINT (to its child with `inChild`, the command `script` runs) and
    /// returns everything it wrote by the time it exited.
    private func watchUntilTwoSnapshots(_ executable: URL, _ arguments: [String], marker: String, inChild: Bool = false) async throws -> String {
        let outputURL = FileManager.default.temporaryDirectory.appendingPathComponent("balancer-watch-\(UUID().uuidString).out")
        _ = FileManager.default.createFile(atPath: outputURL.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: outputURL) }
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("BALANCER_") }
        process.standardOutput = try FileHandle(forWritingTo: outputURL)
        process.standardError = process.standardOutput
        try process.run()
        defer { if process.isRunning { process.terminate() } }
        let output = { (try? String(contentsOf: outputURL, encoding: .utf8)) ?? "" }
        let twoSnapshots = try await eventually(timeout: .seconds(30)) {
            output().components(separatedBy: marker).count - 1 >= 2 || !process.isRunning
        }
        #expect(twoSnapshots && process.isRunning, "no two snapshots within 30 s: \(output().debugDescription)")
        let target = inChild ? try #require(try childPID(of: process.processIdentifier)) : process.processIdentifier
        kill(target, SIGINT)
        #expect(try await eventually { !process.isRunning }, "it did not exit on SIGINT")
        return output()
    }
}

import Foundation
import Testing

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The built `balancer` executable, next to this test bundle (`swift build` first),
/// or `TEST_BALANCER_BIN` (not a `BALANCER_*` name: `serve` refuses unknown `BALANCER_*` variables).
let balancerBinary: URL? = {
    if let path = ProcessInfo.processInfo.environment["TEST_BALANCER_BIN"] { return URL(fileURLWithPath: path) }
    var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = directory.appendingPathComponent("balancer")
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
        directory = directory.deletingLastPathComponent()
    }
    return nil
}()

/// `balancer serve` as a child process, the way a user starts it.
final class ServeProcess: @unchecked Sendable {
    let process = Process()
    let logURL: URL
    /// Where the server's standard output (the access log) goes.
    let outputURL: URL
    private(set) var port = 0

    /// - Parameter asPID1: run it as PID 1 of a new PID namespace, as in a container.
    init(_ arguments: [String], environment: [String: String] = [:], asPID1: Bool = false) throws {
        let binary = try #require(balancerBinary, "build the balancer executable first: swift build")
        logURL = FileManager.default.temporaryDirectory.appendingPathComponent("balancer-e2e-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: logURL.path, contents: nil)
        outputURL = logURL.deletingPathExtension().appendingPathExtension("out")
        _ = FileManager.default.createFile(atPath: outputURL.path, contents: nil)
        if asPID1 {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
            process.arguments = ["--pid", "--fork", "--mount-proc", binary.path, "serve"] + arguments
        } else {
            process.executableURL = binary
            process.arguments = ["serve"] + arguments
        }
        var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("BALANCER_") }
        env.merge(environment) { _, new in new }
        process.environment = env
        process.standardOutput = try FileHandle(forWritingTo: outputURL)
        process.standardError = try FileHandle(forWritingTo: logURL)
    }

    var log: String { (try? String(contentsOf: logURL, encoding: .utf8)) ?? "" }
    var output: String { (try? String(contentsOf: outputURL, encoding: .utf8)) ?? "" }

    /// Starts it and waits for its "listening" log line, which gives the real port.
    func start() async throws {
        try process.run()
        let ready = try await eventually(timeout: .seconds(10)) {
            guard let line = self.log.split(separator: "\n").first(where: { $0.contains("listening") }),
                let address = line.split(separator: " ").first(where: { $0.hasPrefix("address=") }),
                let port = address.split(separator: ":").last.flatMap({ Int($0) })
            else { return !self.process.isRunning }
            self.port = port
            return true
        }
        #expect(ready && port != 0, "server did not start: \(log)")
    }

    func url(_ path: String) -> URL { URL(string: "http://127.0.0.1:\(port)\(path)")! }

    /// Waits for the process to end; returns its exit status.
    func waitForExit(timeout: Duration = .seconds(20)) async throws -> Int32 {
        let exited = try await eventually(timeout: timeout) { !self.process.isRunning }
        if !exited {
            process.terminate()
            Issue.record("balancer serve did not exit in time")
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    func stop() {
        if process.isRunning {
            if let child = try? childPID(of: process.processIdentifier) { kill(child, SIGKILL) }
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: logURL)
        try? FileManager.default.removeItem(at: outputURL)
    }
}

/// Runs blocking work (waiting for a child process) on a Dispatch thread, so
/// it never holds one of Swift concurrency's few threads that the in-process
/// servers of other tests need.
func offCooperativePool<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(returning: work()) }
    }
}

/// Whether this process may make a PID namespace (root, util-linux unshare).
let canUnsharePID: Bool = {
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare") else { return false }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
    process.arguments = ["--pid", "--fork", "--mount-proc", "/bin/true"]
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    guard (try? process.run()) != nil else { return false }
    process.waitUntilExit()
    return process.terminationStatus == 0
}()

/// The first child of process `pid`, from /proc.
func childPID(of pid: Int32) throws -> Int32? {
    let children = try String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8)
    return children.split(separator: " ").first.flatMap { Int32($0) }
}

/// Runs `arguments` and returns (exit status, stdout + stderr).
func runBalancer(_ arguments: [String], environment: [String: String] = [:]) async throws -> (Int32, String) {
    let binary = try #require(balancerBinary, "build the balancer executable first: swift build")
    return try await runProcess(binary, arguments, environment: environment)
}

/// Runs `executable` with `arguments` and returns (exit status, stdout + stderr);
/// `BALANCER_*` variables are not inherited.
func runProcess(_ executable: URL, _ arguments: [String], environment: [String: String] = [:]) async throws -> (Int32, String) {
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("BALANCER_") }
    env.merge(environment) { _, new in new }
    process.environment = env
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = await offCooperativePool {
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return data
    }
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}

func curl(_ arguments: [String]) async throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
    process.arguments = ["-s", "--max-time", "10"] + arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    let data = await offCooperativePool {
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return data
    }
    return String(decoding: data, as: UTF8.self)
}

@Suite("End to end: the built balancer serve", .serialized, .enabled(if: balancerBinary != nil))
struct EndToEndTests {
    @Test("curl POST /jobs and GET /stats")
    func curlJobs() async throws {
        let server = try ServeProcess(["--port", "0", "--workers", "4"])
        defer { server.stop() }
        try await server.start()
        let answer = try await curl(["-X", "POST", "-d", #"{"op":"multiply","x":6,"y":7}"#, server.url("/jobs").absoluteString])
        #expect(answer.contains(#""op":"multiply","result":42,"worker":"#))
        let stats = try await curl([server.url("/stats?format=text").absoluteString])
        #expect(stats.contains("pending mean"))
        let problem = try await curl(["-X", "POST", "-d", #"{"op":"nope"}"#, server.url("/jobs").absoluteString])
        #expect(problem.contains(#""error":"unknown_op""#))
        kill(server.process.processIdentifier, SIGTERM)
        #expect(try await server.waitForExit() == 0)
    }

    @Test("64 concurrent 1 s sleeps on 8 workers: each worker's pending is within 1 of the others")
    func balance() async throws {
        let server = try ServeProcess(["--port", "0", "--workers", "8"])
        defer { server.stop() }
        try await server.start()
        let url = server.url("/jobs")
        try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<64 {
                // Long enough that none ends before all 64 are in, even on a loaded
                // machine; short enough that each worker's 8, one after another,
                // end within the client's timeout.
                group.addTask { try await request(url, method: "POST", body: #"{"op":"sleep","ms":1000}"#).status }
            }
            #expect(try await eventually {
                let stats = try await request(server.url("/stats")).json
                let totals = try #require(stats["totals"] as? [String: Any])
                return (totals["submitted"] as? NSNumber)?.intValue == 64
            })
            let stats = try await request(server.url("/stats")).json
            let workers = try #require(stats["workers"] as? [[String: Any]])
            let pending = workers.compactMap { ($0["pending"] as? NSNumber)?.intValue }
            #expect(pending.count == 8)
            #expect(pending.reduce(0, +) > 8, "the jobs should still be running: \(pending)")
            #expect((pending.max() ?? 0) - (pending.min() ?? 0) <= 1, "pending per worker: \(pending)")
            var statuses: [Int] = []
            for try await status in group { statuses.append(status) }
            #expect(statuses.count == 64 && statuses.allSatisfy { $0 == 200 })
        }
        kill(server.process.processIdentifier, SIGTERM)
        #expect(try await server.waitForExit() == 0)
    }

    @Test("SIGTERM with jobs in flight: every in-flight job gets its 200, and the exit code is 0")
    func sigtermDrain() async throws {
        let server = try ServeProcess(["--port", "0", "--workers", "4", "--capacity", "2"])
        defer { server.stop() }
        try await server.start()
        let url = server.url("/jobs")
        try await withThrowingTaskGroup(of: (Int, String).self) { group in
            // 8 running and 8 queued behind them.
            for _ in 0..<16 {
                group.addTask {
                    let result = try await request(url, method: "POST", body: #"{"op":"sleep","ms":2000}"#)
                    return (result.status, result.header("Connection") ?? "")
                }
            }
            #expect(try await eventually {
                let stats = try await request(server.url("/stats")).json
                let totals = try #require(stats["totals"] as? [String: Any])
                return (totals["in_flight"] as? NSNumber)?.intValue == 16
            })
            kill(server.process.processIdentifier, SIGTERM)
            var results: [(Int, String)] = []
            for try await result in group { results.append(result) }
            #expect(results.count == 16)
            #expect(results.allSatisfy { $0.0 == 200 }, "statuses: \(results.map(\.0))")
        }
        #expect(try await server.waitForExit() == 0, "log: \(server.log)")
        #expect(server.log.contains("draining"))
    }

    @Test(
        "as PID 1 of its own PID namespace (as in a container), SIGTERM still drains and exits 0",
        .enabled(if: canUnsharePID)
    )
    func sigtermAsPID1() async throws {
        let server = try ServeProcess(["--port", "0"], asPID1: true)
        defer { server.stop() }
        try await server.start()
        // The balancer is the child of unshare, and PID 1 inside the namespace.
        let child = try #require(try childPID(of: server.process.processIdentifier))
        let status = try String(contentsOfFile: "/proc/\(child)/status", encoding: .utf8)
        #expect(status.split(separator: "\n").contains { $0.hasPrefix("NSpid:") && $0.hasSuffix("\t1") })
        let url = server.url("/jobs")
        async let job = request(url, method: "POST", body: #"{"op":"sleep","ms":2000}"#)
        #expect(try await eventually {
            let stats = try await request(server.url("/stats")).json
            return ((stats["totals"] as? [String: Any])?["in_flight"] as? NSNumber)?.intValue == 1
        })
        kill(child, SIGTERM)
        #expect(try await job.status == 200)
        #expect(try await server.waitForExit() == 0, "log: \(server.log)")
    }

    @Test("a bad value stops start-up with a message naming the key and a non-zero exit")
    func badConfiguration() async throws {
        let (status, output) = try await runBalancer(["serve", "--workers", "many"])
        #expect(status != 0)
        #expect(output.contains("--workers"))
        let (envStatus, envOutput) = try await runBalancer(["serve"], environment: ["BALANCER_STRATEGY": "random"])
        #expect(envStatus != 0)
        #expect(envOutput.contains("BALANCER_STRATEGY"))
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("bad-\(UUID().uuidString).json")
        try Data(#"{"workers": 4, "colour": "blue"}"#.utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let (fileStatus, fileOutput) = try await runBalancer(["serve", "--config", file.path])
        #expect(fileStatus != 0)
        #expect(fileOutput.contains("colour"))
    }

    @Test("--print-config shows the layers merged")
    func printConfig() async throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString).json")
        try Data(#"{"workers": 4, "capacity": 3}"#.utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let (status, output) = try await runBalancer(
            ["serve", "--print-config", "--workers", "6"],
            environment: ["BALANCER_CONFIG": file.path, "BALANCER_CAPACITY": "5"]
        )
        #expect(status == 0)
        #expect(output.contains(#""workers": 6"#))
        #expect(output.contains(#""capacity": 5"#))
        #expect(output.contains(#""port": 8080"#))
    }

    @Test("a port in use is a one-line error, and healthcheck finds a live server")
    func portInUse() async throws {
        let server = try ServeProcess(["--port", "0"])
        defer { server.stop() }
        try await server.start()
        let (status, output) = try await runBalancer(["serve", "--port", String(server.port)])
        #expect(status != 0)
        let lines = output.split(separator: "\n")
        #expect(lines.count == 1, "output: \(output)")
        #expect(output.contains("address already in use"))
        let (healthy, _) = try await runBalancer(["healthcheck", "--port", String(server.port)])
        #expect(healthy == 0)
        kill(server.process.processIdentifier, SIGTERM)
        #expect(try await server.waitForExit() == 0)
        let (unhealthy, _) = try await runBalancer(["healthcheck", "--port", String(server.port), "--timeout-ms", "500"])
        #expect(unhealthy == 1)
    }

    @Test("healthcheck with port or admin_port 0 (any free port) says so and exits 2; --timeout-ms must be positive")
    func healthcheckWithoutFixedPort() async throws {
        let (adminStatus, adminOutput) = try await runBalancer(["healthcheck"], environment: ["BALANCER_ADMIN_PORT": "0"])
        #expect(adminStatus == 2)
        #expect(adminOutput.contains("admin_port is 0 (any free port)") && adminOutput.contains("--port"), "\(adminOutput)")
        let (portStatus, portOutput) = try await runBalancer(["healthcheck"], environment: ["BALANCER_PORT": "0"])
        #expect(portStatus == 2)
        #expect(portOutput.contains("port is 0 (any free port)"), "\(portOutput)")
        let (zero, zeroOutput) = try await runBalancer(["healthcheck", "--port", "1", "--timeout-ms", "0"])
        #expect(zero == 64 && zeroOutput.contains("--timeout-ms must be positive"), "\(zeroOutput)")
    }
}

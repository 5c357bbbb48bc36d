import ArgumentParser
import BalancerServer
import Foundation

/// `balancer stats`: a running server's `/stats` as a terminal view, once or
/// redrawn every second like top.
struct StatsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Show a running server's workers, pending bars, totals and latencies (GET /stats).",
        discussion: """
            One line per worker with its pending count as a bar scaled to the capacity, then the pool's backlog, \
            totals, mean and variance of pending, and p50/p99 latencies when the server reports them; the upstream \
            pool's workers too when the server proxies. --watch redraws in place every second on a terminal \
            (Ctrl-C ends it) and prints one snapshot after another otherwise.
            """
    )

    @OptionGroup var server: ServerAddress

    @Flag(help: "Fetch and show again every --interval-ms until interrupted.")
    var watch = false

    @Flag(help: "Print /stats as the server sent it (JSON).")
    var json = false

    @Option(help: "Time between snapshots with --watch.")
    var intervalMs = 1_000

    func validate() throws {
        guard intervalMs > 0 else { throw ValidationError("--interval-ms must be positive") }
    }

    func run() async throws {
        let client = try server.client(timeout: .seconds(5))
        guard watch else {
            do {
                print(render(try await client.withConnection { try await fetch($0) }), terminator: "")
            } catch {
                printError("balancer stats: \(error)")
                throw ExitCode.failure
            }
            return
        }
        guard isatty(STDOUT_FILENO) == 1 else {
            // Unbuffered, so a pipe or a log file gets each snapshot whole at once.
            await poll(client) { snapshot in
                let text: String
                switch snapshot {
                case .success(let stats): text = render(stats)
                case .failure(let error): text = "balancer stats: \(error)\n"
                }
                FileHandle.standardOutput.write(Data((text + "\n").utf8))
            }
            return
        }
        try await watchOnTerminal(client)
    }

    /// Redraws in place (home, each line cleared to its end, the rest of the
    /// screen cleared) with the cursor hidden; SIGINT or SIGTERM end it and
    /// show the cursor again.
    private func watchOnTerminal(_ client: HTTPClient) async throws {
        let output = FileHandle.standardOutput
        output.write(Data("\u{1B}[?25l\u{1B}[2J".utf8))
        let drawing = Task {
            await poll(client) { snapshot in
                var text: String
                switch snapshot {
                case .success(let stats): text = render(stats)
                case .failure(let error): text = "balancer stats: \(error)\n"
                }
                text = text.split(separator: "\n", omittingEmptySubsequences: false)
                    .map { $0 + "\u{1B}[K" }.joined(separator: "\n")
                output.write(Data(("\u{1B}[H" + text + "\u{1B}[J").utf8))
            }
        }
        let signals = [SIGINT, SIGTERM].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { drawing.cancel() }
            source.resume()
            return source
        }
        await drawing.value
        signals.forEach { $0.cancel() }
        output.write(Data("\u{1B}[?25h".utf8))
    }

    /// Fetches a snapshot every interval on one keep-alive connection (a new
    /// one after a failure) and hands each to `show`, until cancelled.
    private func poll(_ client: HTTPClient, show: @escaping @Sendable (Result<String, any Error>) -> Void) async {
        let interval = Duration.milliseconds(intervalMs)
        while !Task.isCancelled {
            do {
                try await client.withConnection { connection in
                    while connection.isOpen {
                        let started = ContinuousClock.now
                        show(.success(try await fetch(connection)))
                        try await Task.sleep(until: started + interval)
                    }
                }
            } catch {
                if Task.isCancelled { return }
                show(.failure(error))
                try? await Task.sleep(for: interval)
            }
        }
    }

    /// `GET /stats`: the body as it came, checked to be JSON.
    private func fetch(_ connection: HTTPClientConnection) async throws -> String {
        let response = try await connection.send(.get("/stats"))
        guard response.status.code == 200 else { throw StatsFailure(errorMessage(of: response)) }
        return response.text
    }

    /// The view of one snapshot: the raw JSON with --json, else the table.
    private func render(_ text: String) -> String {
        if json { return text.hasSuffix("\n") ? text : text + "\n" }
        guard let stats = try? JSONParser.parse(Array(text.utf8)) else {
            return "balancer stats: /stats did not answer JSON: \(text)\n"
        }
        return StatsView(stats: stats, url: server.url).lines.joined(separator: "\n") + "\n"
    }
}

struct StatsFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// `/stats` as lines of text. Every field is read with absence tolerated: a
/// server that does not report something (latencies, an upstream pool) gets
/// no line or column for it.
struct StatsView {
    let stats: JSONValue
    let url: String

    /// Cells of a pending bar at full capacity.
    static let barWidth = 20

    var lines: [String] {
        var lines: [String] = []
        let capacity = stats["capacity"]?.int ?? 1
        var header = url
        if let strategy = stats["strategy"]?.string { header += "  \(strategy)" }
        header += "  capacity \(capacity)"
        if let uptime = stats["uptime_s"]?.double { header += "  uptime " + String(format: "%.1f s", uptime) }
        if stats["shutting_down"]?.bool == true { header += "  DRAINING" }
        lines.append(header)

        let workers = stats["workers"]?.array ?? []
        let latencies = workers.contains { $0["latency_us"]?["total"] != nil }
        var title = "worker  state     " + "pending".padding(toLength: Self.barWidth + 4, withPad: " ", startingAt: 0)
            + "  completed     failed"
        if latencies { title += "        p50        p99" }
        lines.append(title)
        for worker in workers {
            var line = pad(worker["id"]?.int, 6) + "  " + (worker["state"]?.string ?? "?").padding(toLength: 8, withPad: " ", startingAt: 0)
                + "  " + bar(worker["pending"]?.int ?? 0, capacity: capacity)
                + "  " + pad(worker["completed"]?.int, 9) + "  " + pad(worker["failed"]?.int, 9)
            if latencies {
                let total = worker["latency_us"]?["total"]
                line += "  " + duration(total?["p50"]?.int).leftPadded(9) + "  " + duration(total?["p99"]?.int).leftPadded(9)
            }
            lines.append(line)
        }
        lines.append(queueLine(stats["queue"]))
        if let totals = stats["totals"] {
            let names = ["submitted", "completed", "failed", "cancelled", "in_flight"]
            lines.append(
                "totals  " + names.compactMap { name in totals[name]?.int.map { "\(name) \($0)" } }.joined(separator: "  ")
            )
        }
        lines.append(meanLine(stats))
        if let latency = stats["latency_us"] {
            let parts = ["queue", "run", "total"].compactMap { phase -> String? in
                guard let figures = latency[phase] else { return nil }
                return "\(phase) p50 \(duration(figures["p50"]?.int))  p99 \(duration(figures["p99"]?.int))"
            }
            lines.append("latency " + parts.joined(separator: "   "))
        }
        for pool in stats["pools"]?.array ?? [] {
            lines.append("")
            lines.append(contentsOf: upstreamLines(pool))
        }
        return lines
    }

    private func upstreamLines(_ upstream: JSONValue) -> [String] {
        var lines = ["pool " + (upstream["name"]?.string ?? "?") + "  " + (upstream["strategy"]?.string ?? "")]
        lines.append(
            "worker  backend               state     " + "pending".padding(toLength: Self.barWidth + 4, withPad: " ", startingAt: 0)
                + "   requests        2xx        4xx        5xx     errors"
        )
        for worker in upstream["workers"]?.array ?? [] {
            let errors = worker["errors"].map { errors in
                (errors.objectValues).compactMap(\.int).reduce(0, +)
            }
            lines.append(
                pad(worker["id"]?.int, 6) + "  " + (worker["backend"]?.string ?? "?").padding(toLength: 20, withPad: " ", startingAt: 0)
                    + "  " + (worker["state"]?.string ?? "?").padding(toLength: 8, withPad: " ", startingAt: 0)
                    + "  " + bar(worker["pending"]?.int ?? 0, capacity: 1)
                    + "  " + pad(worker["requests"]?.int, 9)
                    + ["2xx", "4xx", "5xx"].map { "  " + pad(worker["responses"]?[$0]?.int, 9) }.joined()
                    + "  " + pad(errors, 9)
            )
        }
        lines.append(queueLine(upstream["queue"]))
        lines.append(meanLine(upstream))
        return lines
    }

    private func queueLine(_ queue: JSONValue?) -> String {
        guard let queue else { return "backlog ?" }
        var line = "backlog \(queue["depth"]?.int ?? 0)/\(queue["limit"]?.int ?? 0)"
        for name in ["overloaded", "timed_out", "unavailable"] {
            if let count = queue[name]?.int { line += "  \(name) \(count)" }
        }
        return line
    }

    private func meanLine(_ pool: JSONValue) -> String {
        let mean = pool["pending_mean"]?.double ?? 0
        let variance = pool["pending_variance"]?.double ?? 0
        return "pending mean " + String(format: "%.2f", mean) + "  variance " + String(format: "%.2f", variance)
    }

    /// `pending` right-aligned, then a bar of ``barWidth`` cells scaled to
    /// `capacity`: any pending request shows at least one full cell.
    private func bar(_ pending: Int, capacity: Int) -> String {
        let filled = min(Self.barWidth, (pending * Self.barWidth + max(capacity, 1) - 1) / max(capacity, 1))
        return pad(pending, 3) + " " + String(repeating: "█", count: filled)
            + String(repeating: "·", count: Self.barWidth - filled)
    }

    private func pad(_ value: Int?, _ width: Int) -> String {
        (value.map(String.init) ?? "-").leftPadded(width)
    }

    /// Microseconds as µs, ms or s, to about three significant digits.
    private func duration(_ microseconds: Int?) -> String {
        guard let microseconds else { return "-" }
        switch microseconds {
        case ..<1_000: return "\(microseconds) µs"
        case ..<1_000_000: return String(format: "%.1f ms", Double(microseconds) / 1_000)
        default: return String(format: "%.2f s", Double(microseconds) / 1_000_000)
        }
    }
}

extension JSONValue {
    /// The values of an object's members; empty for other values.
    fileprivate var objectValues: [JSONValue] {
        guard case .object(let object) = self else { return [] }
        return object.members.map(\.value)
    }
}

extension String {
    fileprivate func leftPadded(_ width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }
}

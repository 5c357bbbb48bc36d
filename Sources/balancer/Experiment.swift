import ArgumentParser
import BalancerCore
import BalancerServer
import Foundation
import Synchronization

/// `balancer experiment`: the talk's requesters against every strategy, with
/// a table, JSON and a picture. The experiment itself is
/// ``Experiment`` in BalancerServer; this is its command line.
struct ExperimentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "experiment",
        abstract: "Reproduce the talk: requesters with random think time and random work against every strategy.",
        discussion: """
            R requesters each wait an exponentially distributed think time, send a sleep job of random length and \
            wait for the answer. In process (the default) every strategy runs in turn on a fresh balancer with the \
            same random seeds; with --url the jobs go to a running server (POST /jobs) and its own strategy is \
            measured. Prints one row per strategy (throughput, latency p50/p90/p99/max, time-averaged mean and \
            variance of pending) and writes a picture: the latency CDF per strategy and the variance of pending \
            over time (SVG, and PNG when rsvg-convert is installed).
            """
    )

    enum Distribution: String, ExpressibleByArgument, CaseIterable {
        case constant, exponential, bimodal
    }

    @Option(help: "Requesters (R), each with one request at a time.")
    var requesters = 100

    @Option(help: "Workers (W), in process.")
    var workers = 10

    @Option(help: "Requests a worker may hold (C), in process; default: the number of requesters.")
    var capacity: Int?

    @Option(name: .customLong("think-ms"), help: "Mean think time between a requester's answer and its next request.")
    var thinkMilliseconds = 100.0

    @Option(help: "How job lengths are drawn: \(Distribution.allCases.map(\.rawValue).joined(separator: ", ")).")
    var distribution = Distribution.exponential

    @Option(name: .customLong("work-ms"), help: "Job length: the constant, the exponential mean, or bimodal's fast length.")
    var workMilliseconds = 10.0

    @Option(name: .customLong("slow-ms"), help: "Bimodal: the slow jobs' length.")
    var slowMilliseconds = 200.0

    @Option(help: "Bimodal: the fraction of jobs that are slow.")
    var slowFraction = 0.02

    @Option(help: "Seconds per strategy (requesters start no request after, but each sends one).")
    var seconds: Double?

    @Option(help: "Requests per strategy, instead of --seconds.")
    var requests: Int?

    @Option(help: "Seed of every requester's random numbers; the same for every strategy.")
    var seed: UInt64 = 1

    @Option(
        name: .customLong("strategy"),
        help: "Run only this strategy (repeatable); default: all of \(Strategy.allCases.map(\.rawValue).joined(separator: ", "))."
    )
    var strategies: [Strategy] = []

    @Option(help: ArgumentHelp("Send the jobs to this running server instead: http://host:port.", valueName: "url"))
    var url: String?

    @Option(help: "Where to write the picture; a PNG goes beside it when rsvg-convert exists.")
    var svg = "experiment.svg"

    @Flag(help: "Print the results as JSON instead of a table.")
    var json = false

    func validate() throws {
        if seconds != nil && requests != nil { throw ValidationError("give --seconds or --requests, not both") }
        if url != nil && (!strategies.isEmpty || capacity != nil) {
            throw ValidationError("--strategy and --capacity are for the in-process run; a server has its own")
        }
        let problems = settings.problems
        if !problems.isEmpty { throw ValidationError(problems.joined(separator: "; ")) }
    }

    var settings: Experiment.Configuration {
        var settings = Experiment.Configuration()
        settings.requesters = requesters
        settings.workers = workers
        settings.capacity = capacity
        settings.thinkMilliseconds = thinkMilliseconds
        switch distribution {
        case .constant: settings.work = .constant(milliseconds: workMilliseconds)
        case .exponential: settings.work = .exponential(meanMilliseconds: workMilliseconds)
        case .bimodal:
            settings.work = .bimodal(fastMilliseconds: workMilliseconds, slowMilliseconds: slowMilliseconds, slowFraction: slowFraction)
        }
        if let requests {
            settings.limit = .requests(requests)
        } else {
            settings.limit = .duration(.milliseconds(Int64((seconds ?? 10) * 1000)))
        }
        settings.seed = seed
        if !strategies.isEmpty { settings.strategies = strategies }
        return settings
    }

    func run() async throws {
        let settings = self.settings
        let target: Experiment.Target
        if let url {
            do {
                target = .server(try HTTPClient(url: url, configuration: .init(timeout: .seconds(60))))
            } catch {
                throw ValidationError("--url: \(error.reason)")
            }
        } else {
            target = .inProcess
        }
        let bar = ProgressBar()
        let results: [Experiment.Result]
        do {
            results = try await Experiment.run(settings, target: target) { bar.show($0) }
        } catch {
            bar.clear()
            printError("balancer experiment: \(error)")
            throw ExitCode.failure
        }
        bar.clear()
        print(json ? ExperimentReport.json(results, settings) : ExperimentReport.table(results, settings), terminator: "")
        do {
            try ExperimentSVG.render(results, settings).write(toFile: svg, atomically: true, encoding: .utf8)
        } catch {
            printError("balancer experiment: cannot write \(svg): \(error.localizedDescription)")
            throw ExitCode.failure
        }
        let png = (svg.hasSuffix(".svg") ? String(svg.dropLast(4)) : svg) + ".png"
        let wrote = convertToPNG(svg, png) ? "\(svg) and \(png)" : svg
        printError("wrote \(wrote)")
    }

    /// Runs rsvg-convert if it is installed; false if it is not or it failed.
    private func convertToPNG(_ svg: String, _ png: String) -> Bool {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["rsvg-convert", "--output", png, svg]
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return false }
        process.waitUntilExit()
        return process.terminationStatus == 0
    }
}

/// A one-line progress bar on standard error, drawn only when it is a terminal.
private final class ProgressBar: Sendable {
    private let enabled = isatty(STDERR_FILENO) == 1
    private let last = Mutex(-1)

    func show(_ fraction: Double) {
        guard enabled else { return }
        let percent = Int((min(max(fraction, 0), 1) * 100).rounded(.down))
        let changed = last.withLock { last in
            defer { last = percent }
            return last != percent
        }
        guard changed else { return }
        let width = 40
        let filled = percent * width / 100
        let line = "\r[" + String(repeating: "#", count: filled) + String(repeating: " ", count: width - filled) + "] \(percent)%"
        FileHandle.standardError.write(Data(line.utf8))
    }

    func clear() {
        guard enabled else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
    }
}

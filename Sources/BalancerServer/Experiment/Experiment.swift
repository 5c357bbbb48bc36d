import BalancerCore
import Histogram
import RealModule
import Synchronization

/// The talk's requesters as a one-command experiment: R requesters, each
/// pausing for an exponentially distributed think time, then sending a `sleep`
/// job of random length and waiting for its answer, against every strategy in
/// turn with the same random seeds. It measures throughput, the latency
/// distribution and, sampled at a fixed interval, the mean and variance of the
/// workers' `pending`: the figures the talk's program printed.
///
/// In process (``Target/inProcess``) each strategy gets a fresh ``Balancer``
/// running the built-in `sleep` job; over HTTP (``Target/server(_:)``) the
/// requesters post the same jobs to a running server, one keep-alive
/// connection each, and the server's own strategy is the one measured.
public enum Experiment {
    /// How long a `sleep` job runs.
    public enum Work: Sendable, Equatable {
        /// Every job the same length.
        case constant(milliseconds: Double)
        /// Exponentially distributed lengths with this mean (the talk's random work).
        case exponential(meanMilliseconds: Double)
        /// Mostly `fast`, with a `slowFraction` of `slow` jobs: skewed work.
        case bimodal(fastMilliseconds: Double, slowMilliseconds: Double, slowFraction: Double)

        /// One job's length in whole milliseconds (what a `sleep` job takes).
        func draw(using random: inout SplitMix64) -> Int64 {
            switch self {
            case .constant(let ms):
                return Int64(ms.rounded())
            case .exponential(let mean):
                return Int64(randomExponential(mean: mean, using: &random).rounded())
            case .bimodal(let fast, let slow, let slowFraction):
                return Int64((Double.random(in: 0..<1, using: &random) < slowFraction ? slow : fast).rounded())
            }
        }

        /// How the work reads in a table's caption.
        public var description: String {
            switch self {
            case .constant(let ms): "constant \(StatsRendering.fixed(ms, 1)) ms"
            case .exponential(let mean): "exponential, mean \(StatsRendering.fixed(mean, 1)) ms"
            case .bimodal(let fast, let slow, let fraction):
                "bimodal \(StatsRendering.fixed(fast, 1)) ms, \(StatsRendering.fixed(fraction * 100, 1))% at \(StatsRendering.fixed(slow, 1)) ms"
            }
        }
    }

    /// When each strategy's run ends.
    public enum Limit: Sendable, Equatable {
        /// Requesters start no request after this long, but each sends at
        /// least one (a stalled machine still gives results).
        case duration(Duration)
        /// Requesters start this many requests in all.
        case requests(Int)
    }

    /// Where the requesters send their jobs.
    public enum Target: Sendable {
        /// A fresh ``Balancer`` per strategy, in this process; no HTTP.
        case inProcess
        /// `POST /jobs` to a running server; `GET /stats` for `pending`.
        case server(HTTPClient)
    }

    public struct Configuration: Sendable, Equatable {
        /// R: requesters, each with one request at a time.
        public var requesters = 100
        /// W: workers (in process; a server has its own).
        public var workers = 10
        /// C per worker (in process); `nil` means R, the talk's channel buffers:
        /// a request never waits in the backlog except under `shared-queue`.
        public var capacity: Int?
        /// Mean think time between a requester's answer and its next request.
        public var thinkMilliseconds = 100.0
        public var work = Work.exponential(meanMilliseconds: 10)
        public var limit = Limit.duration(.seconds(10))
        /// Seeds every requester's generator; the same for every strategy.
        public var seed: UInt64 = 1
        /// Strategies to run, in order (in process).
        public var strategies = Strategy.allCases
        /// How often `pending` is sampled.
        public var sampleInterval = Duration.milliseconds(10)

        public init() {}

        /// Problems with the values, each naming its option; empty when valid.
        public var problems: [String] {
            var problems: [String] = []
            if requesters < 1 { problems.append("requesters must be 1 or more") }
            if workers < 1 { problems.append("workers must be 1 or more") }
            if let capacity, capacity < 1 { problems.append("capacity must be 1 or more") }
            if !(thinkMilliseconds >= 0) { problems.append("think-ms must be 0 or more") }
            switch work {
            case .constant(let ms), .exponential(let ms):
                if !(ms >= 0) { problems.append("work-ms must be 0 or more") }
            case .bimodal(let fast, let slow, let fraction):
                if !(fast >= 0) || !(slow >= 0) { problems.append("work-ms and slow-ms must be 0 or more") }
                if !(0...1).contains(fraction) { problems.append("slow-fraction must be from 0 to 1") }
            }
            switch limit {
            case .duration(let duration): if duration <= .zero { problems.append("seconds must be above zero") }
            case .requests(let count): if count < 1 { problems.append("requests must be 1 or more") }
            }
            if strategies.isEmpty { problems.append("at least one strategy is needed") }
            if sampleInterval <= .zero { problems.append("the sample interval must be above zero") }
            return problems
        }
    }

    /// `pending` across the workers at one moment of a run.
    public struct Sample: Sendable, Equatable {
        /// Since the run started.
        public var seconds: Double
        public var mean: Double
        public var variance: Double
    }

    /// What one strategy's run measured.
    public struct Result: Sendable {
        public var strategy: String
        /// Requests answered with their value.
        public var requests: Int
        /// Requests answered with an error (refused, timed out, failed).
        public var errors: Int
        /// From the first request to the last answer.
        public var elapsed: Duration
        /// Latency of each answered request as its requester saw it, in microseconds.
        public var latency: Histogram<UInt64>
        /// `pending` sampled every ``Configuration/sampleInterval``.
        public var samples: [Sample]

        public var throughput: Double { elapsed > .zero ? Double(requests) / elapsed.seconds : 0 }
        /// Time average of the mean of `pending` across the workers.
        public var pendingMean: Double { average(samples.map(\.mean)) }
        /// Time average of the variance of `pending` across the workers, the talk's figure.
        public var pendingVariance: Double { average(samples.map(\.variance)) }

        /// The latency at `percentile` (0 to 100), in milliseconds.
        public func latencyMilliseconds(at percentile: Double) -> Double {
            Double(latency.valueAtPercentile(percentile)) / 1000
        }

        public var maxLatencyMilliseconds: Double { Double(latency.max) / 1000 }
    }

    /// Runs every strategy in `configuration.strategies` (or, against a
    /// server, the server's one) and returns their results in order.
    /// `progress` hears the fraction of the whole experiment done, now and then.
    public static func run(
        _ configuration: Configuration,
        target: Target = .inProcess,
        progress: @escaping @Sendable (Double) -> Void = { _ in }
    ) async throws -> [Result] {
        precondition(configuration.problems.isEmpty, configuration.problems.joined(separator: "; "))
        switch target {
        case .inProcess:
            var results: [Result] = []
            for (index, strategy) in configuration.strategies.enumerated() {
                let share = 1 / Double(configuration.strategies.count)
                results.append(
                    try await runInProcess(configuration, strategy: strategy) { done in
                        progress((Double(index) + done) * share)
                    }
                )
            }
            return results
        case .server(let client):
            return [try await runAgainstServer(configuration, client: client, progress: progress)]
        }
    }

    // MARK: - Targets

    private static func runInProcess(
        _ configuration: Configuration,
        strategy: Strategy,
        progress: @escaping @Sendable (Double) -> Void
    ) async throws -> Result {
        let balancer = Balancer(
            configuration: .init(
                workers: configuration.workers,
                capacity: configuration.capacity ?? configuration.requesters,
                backlog: max(1024, configuration.requesters),
                queueTimeout: .seconds(3600),
                strategy: strategy,
                seed: configuration.seed
            )
        )
        let limits = JobLimits(maxJobMilliseconds: .max)
        return try await withThrowingTaskGroup(of: Result?.self) { group in
            group.addTask {
                await balancer.run()
                return nil
            }
            let result = try await measure(
                configuration,
                strategy: strategy.rawValue,
                progress: progress,
                requester: { body in
                    try await body { ms in
                        let job = try sleepJob(ms, limits: limits)
                        _ = try await balancer.submit { try await job.run() }
                    }
                },
                sample: {
                    let stats = await balancer.stats()
                    return (stats.pendingMean, stats.pendingVariance)
                }
            )
            balancer.shutdown()
            try await group.waitForAll()
            return result
        }
    }

    private static func runAgainstServer(
        _ configuration: Configuration,
        client: HTTPClient,
        progress: @escaping @Sendable (Double) -> Void
    ) async throws -> Result {
        let stats: @Sendable () async throws -> JSONObject = {
            let response = try await client.send(.get("/stats"))
            guard response.status == .ok, case .object(let object) = try JSONParser.parse(response.body) else {
                throw ExperimentError("GET /stats answered \(response.status.code): \(response.text)")
            }
            return object
        }
        guard case .string(let strategy) = try await stats()["strategy"] else {
            throw ExperimentError("GET /stats has no strategy: is \(client.baseURL) a balancer?")
        }
        return try await measure(
            configuration,
            strategy: strategy,
            progress: progress,
            requester: { body in
                try await client.withConnection { connection in
                    try await body { ms in
                        let response = try await connection.send(.post("/jobs", json: "{\"op\":\"sleep\",\"ms\":\(ms)}"))
                        guard response.status == .ok else {
                            throw ExperimentError("POST /jobs answered \(response.status.code): \(response.text)")
                        }
                    }
                }
            },
            sample: {
                let object = try await stats()
                return (object["pending_mean"]?.double ?? 0, object["pending_variance"]?.double ?? 0)
            }
        )
    }

    private static func sleepJob(_ ms: Int64, limits: JobLimits) throws -> any Job {
        try JobRegistry.builtIn.decode(.object(["op": .string("sleep"), "ms": JSONValue(ms)]), limits: limits).job
    }

    // MARK: - The requesters

    /// Runs one strategy: the requesters, each through `requester` (which lends
    /// it a function that runs one sleep job), and a sampler of `pending`.
    private static func measure(
        _ configuration: Configuration,
        strategy: String,
        progress: @escaping @Sendable (Double) -> Void,
        requester: @escaping @Sendable (_ body: (_ sleep: (Int64) async throws -> Void) async throws -> Void) async throws -> Void,
        sample: @escaping @Sendable () async throws -> (mean: Double, variance: Double)
    ) async throws -> Result {
        let clock = ContinuousClock()
        let start = clock.now
        let counts = RunCounts(requesters: configuration.requesters)
        /// Whether a requester may start another request; claims it if so.
        let mayStart: @Sendable (_ first: Bool) -> Bool = { first in
            switch configuration.limit {
            case .duration(let duration):
                return first || clock.now - start < duration
            case .requests(let count):
                return counts.started.add(1, ordering: .relaxed).newValue <= count
            }
        }
        let done: @Sendable () -> Double = {
            switch configuration.limit {
            case .duration(let duration): min(1, (clock.now - start).seconds / duration.seconds)
            case .requests(let count): min(1, Double(counts.started.load(ordering: .relaxed)) / Double(count))
            }
        }
        return try await withThrowingTaskGroup(of: Tally.self) { group in
            group.addTask {
                var samples: [Sample] = []
                while counts.running.load(ordering: .relaxed) > 0 {
                    let (mean, variance) = try await sample()
                    samples.append(Sample(seconds: (clock.now - start).seconds, mean: mean, variance: variance))
                    progress(done())
                    try await clock.sleep(for: configuration.sampleInterval)
                }
                return Tally(samples: samples)
            }
            for index in 0..<configuration.requesters {
                group.addTask {
                    defer { counts.running.subtract(1, ordering: .relaxed) }
                    var tally = Tally()
                    // Requester i draws the same think times and job lengths under every strategy.
                    // Seeds one apart would give streams one step apart: mix first.
                    var seeder = SplitMix64(seed: configuration.seed &+ UInt64(index) &* 0x2545_F491_4F6C_DD1D)
                    var random = SplitMix64(seed: seeder.next())
                    try await requester { sleep in
                        var first = true
                        while true {
                            let think = randomExponential(mean: configuration.thinkMilliseconds, using: &random)
                            let ms = configuration.work.draw(using: &random)
                            try await clock.sleep(for: .microseconds(Int64(think * 1000)))
                            guard mayStart(first) else { return }
                            first = false
                            let sent = clock.now
                            do {
                                try await sleep(ms)
                                tally.latency.record(UInt64((clock.now - sent).microseconds))
                                tally.requests += 1
                            } catch is CancellationError {
                                throw CancellationError()
                            } catch {
                                tally.errors += 1
                            }
                        }
                    }
                    tally.end = clock.now
                    return tally
                }
            }
            var total = Tally()
            for try await tally in group {
                total.add(tally)
            }
            return Result(
                strategy: strategy,
                requests: total.requests,
                errors: total.errors,
                elapsed: (total.end ?? start) - start,
                latency: total.latency,
                samples: total.samples
            )
        }
    }

    /// Shared by a run's tasks: requests started, requesters still running.
    private final class RunCounts: Sendable {
        let started = Atomic<Int>(0)
        let running: Atomic<Int>

        init(requesters: Int) { running = Atomic(requesters) }
    }

    /// What a requester (or the sampler) counted.
    private struct Tally: Sendable {
        var requests = 0
        var errors = 0
        var latency = Histogram<UInt64>(highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)
        var samples: [Sample] = []
        var end: ContinuousClock.Instant?

        mutating func add(_ other: Tally) {
            requests += other.requests
            errors += other.errors
            latency.add(other.latency)
            samples += other.samples
            if let last = other.end, end.map({ last > $0 }) ?? true { end = last }
        }
    }
}

/// Why the experiment could not go on (a server that answered wrongly).
public struct ExperimentError: Error, Sendable, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// An exponentially distributed number with this mean.
private func randomExponential(mean: Double, using random: inout SplitMix64) -> Double {
    // 1 - u is in (0, 1]: its logarithm is finite.
    -mean * Double.log(1 - Double.random(in: 0..<1, using: &random))
}

private func average(_ values: [Double]) -> Double {
    values.isEmpty ? 0 : values.reduce(0, +) / Double(values.count)
}


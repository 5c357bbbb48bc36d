import BalancerCore
import NIOCore

/// The experiment's results as the table it prints, as JSON, and as a picture.
public enum ExperimentReport {
    /// One line of settings, then one row per strategy: throughput, latency
    /// percentiles and the time-averaged mean and variance of `pending`.
    public static func table(_ results: [Experiment.Result], _ configuration: Experiment.Configuration) -> String {
        var lines = [caption(configuration)]
        lines.append(
            "strategy        requests     req/s   p50 ms   p90 ms   p99 ms   max ms  errors  pending mean  variance"
        )
        for result in results {
            let cells = [
                result.strategy.padding(14),
                StatsRendering.pad(String(result.requests), 9),
                StatsRendering.pad(StatsRendering.fixed(result.throughput, 1), 9),
                StatsRendering.pad(StatsRendering.fixed(result.latencyMilliseconds(at: 50), 1), 8),
                StatsRendering.pad(StatsRendering.fixed(result.latencyMilliseconds(at: 90), 1), 8),
                StatsRendering.pad(StatsRendering.fixed(result.latencyMilliseconds(at: 99), 1), 8),
                StatsRendering.pad(StatsRendering.fixed(result.maxLatencyMilliseconds, 1), 8),
                StatsRendering.pad(String(result.errors), 7),
                StatsRendering.pad(StatsRendering.fixed(result.pendingMean, 2), 13),
                StatsRendering.pad(StatsRendering.fixed(result.pendingVariance, 2), 9),
            ]
            lines.append(cells.joined(separator: " "))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The settings in one line, for the table and the picture.
    static func caption(_ configuration: Experiment.Configuration) -> String {
        let limit =
            switch configuration.limit {
            case .duration(let duration): "\(StatsRendering.fixed(duration.seconds, 1)) s per strategy"
            case .requests(let count): "\(count) requests per strategy"
            }
        return "\(configuration.requesters) requesters (think exponential, mean \(StatsRendering.fixed(configuration.thinkMilliseconds, 1)) ms), "
            + "\(configuration.workers) workers, work \(configuration.work.description), \(limit), seed \(configuration.seed)"
    }

    /// Machine-readable results: the settings, and per strategy every figure of the table.
    public static func json(_ results: [Experiment.Result], _ configuration: Experiment.Configuration) -> String {
        let strategies: [JSONValue] = results.map { result in
            .object([
                "strategy": .string(result.strategy),
                "requests": JSONValue(result.requests),
                "errors": JSONValue(result.errors),
                "elapsed_s": JSONValue(result.elapsed.seconds),
                "throughput": JSONValue(result.throughput),
                "latency_ms": .object([
                    "p50": JSONValue(result.latencyMilliseconds(at: 50)),
                    "p90": JSONValue(result.latencyMilliseconds(at: 90)),
                    "p99": JSONValue(result.latencyMilliseconds(at: 99)),
                    "max": JSONValue(result.maxLatencyMilliseconds),
                ]),
                "pending_mean": JSONValue(result.pendingMean),
                "pending_variance": JSONValue(result.pendingVariance),
            ])
        }
        let settings: JSONValue = .object([
            "requesters": JSONValue(configuration.requesters),
            "workers": JSONValue(configuration.workers),
            "think_ms": JSONValue(configuration.thinkMilliseconds),
            "work": .string(configuration.work.description),
            "seed": .string(String(configuration.seed)),
        ])
        var buffer = ByteBuffer()
        buffer.writeJSON(.object(["configuration": settings, "results": .array(strategies)]))
        return String(buffer: buffer) + "\n"
    }
}

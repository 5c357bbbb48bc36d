import BalancerCore

/// `/stats` as JSON and as the talk's fixed-width table, from one ``BalancerStats`` snapshot.
enum StatsRendering {
    /// Latency summaries per worker id, and the pool's.
    typealias Latency = (workers: [Int: LatencySummaries], pool: LatencySummaries)

    /// - Parameter latency: with metrics on, each worker and the pool get `latency_us`.
    static func json(_ stats: BalancerStats, uptime: Duration, latency: Latency? = nil) -> JSONValue {
        let workers: [JSONValue] = stats.workers.map { worker in
            var object: JSONObject = [
                "id": JSONValue(worker.id),
                "state": .string(worker.state.rawValue),
                "pending": JSONValue(worker.pending),
                "pending_max": JSONValue(worker.pendingMax),
                "completed": JSONValue(worker.completed),
                "failed": JSONValue(worker.failed),
            ]
            if let latency { object.members.append((key: "latency_us", value: latencyJSON(latency, worker: worker.id))) }
            return .object(object)
        }
        var object: JSONObject = [
            "uptime_s": JSONValue(rounded(Double(uptime.milliseconds) / 1000, places: 3)),
            "strategy": .string(stats.strategy.rawValue),
            "capacity": JSONValue(stats.capacity),
            "workers": .array(workers),
            "queue": .object([
                "depth": JSONValue(stats.backlogDepth),
                "limit": JSONValue(stats.backlogLimit),
                "timeout_ms": JSONValue(stats.queueTimeout.milliseconds),
                "overloaded": JSONValue(stats.overloaded),
                "timed_out": JSONValue(stats.queueTimeouts),
            ]),
            "totals": .object([
                "submitted": JSONValue(stats.submitted),
                "completed": JSONValue(stats.completed),
                "failed": JSONValue(stats.failed),
                "cancelled": JSONValue(stats.cancelled),
                "shut_down": JSONValue(stats.shutDown),
                "in_flight": JSONValue(stats.inFlight),
            ]),
            "replicas": .object([
                "replicated": JSONValue(stats.replicated),
                "wins": JSONValue(stats.replicaWins),
                "cancelled_copies": JSONValue(stats.cancelledCopies),
                "out_of_range": JSONValue(stats.replicasOutOfRange),
            ]),
            "pending_mean": JSONValue(rounded(stats.pendingMean, places: 4)),
            "pending_variance": JSONValue(rounded(stats.pendingVariance, places: 4)),
            "shutting_down": .bool(stats.shuttingDown),
        ]
        if let latency { object.members.append((key: "latency_us", value: latency.pool.json)) }
        return .object(object)
    }

    /// A worker's `latency_us`; all zero for a worker that has served nothing yet.
    static func latencyJSON(_ latency: Latency, worker: Int) -> JSONValue {
        (latency.workers[worker] ?? .empty).json
    }

    /// One line per worker, then the mean and variance of pending, as the
    /// talk's program printed them. With `latency`, each worker's line ends
    /// with the p50 and p99 of its total time, and a line gives the pool's.
    static func text(_ stats: BalancerStats, uptime: Duration, latency: Latency? = nil) -> String {
        var lines: [String] = []
        lines.append(
            "strategy \(stats.strategy.rawValue)  capacity \(stats.capacity)  uptime \(fixed(Double(uptime.milliseconds) / 1000, 1)) s"
        )
        lines.append(
            "worker  state     pending  pending_max  completed   failed" + (latency == nil ? "" : "  total_p50_us  total_p99_us"))
        for w in stats.workers {
            var line =
                pad(String(w.id), 6) + "  " + w.state.rawValue.padding(8) + "  " + pad(String(w.pending), 7) + "  "
                + pad(String(w.pendingMax), 11) + "  " + pad(String(w.completed), 9) + "  " + pad(String(w.failed), 7)
            if let latency {
                let total = (latency.workers[w.id] ?? .empty).total
                line += "  " + pad(String(total.p50), 12) + "  " + pad(String(total.p99), 12)
            }
            lines.append(line)
        }
        lines.append("pending mean \(fixed(stats.pendingMean, 2))  variance \(fixed(stats.pendingVariance, 2))")
        if let latency {
            let total = latency.pool.total
            lines.append("latency total p50 \(total.p50) us  p99 \(total.p99) us  count \(total.count)")
        }
        lines.append(
            "queue depth \(stats.backlogDepth)/\(stats.backlogLimit)  timeout \(stats.queueTimeout.milliseconds) ms  "
                + "overloaded \(stats.overloaded)  timed_out \(stats.queueTimeouts)"
        )
        lines.append(
            "totals submitted \(stats.submitted)  completed \(stats.completed)  failed \(stats.failed)  "
                + "cancelled \(stats.cancelled)  in_flight \(stats.inFlight)"
        )
        lines.append(
            "replicas replicated \(stats.replicated)  wins \(stats.replicaWins)  "
                + "cancelled_copies \(stats.cancelledCopies)  out_of_range \(stats.replicasOutOfRange)"
        )
        return lines.joined(separator: "\n") + "\n"
    }

    static func pad(_ s: String, _ width: Int) -> String {
        s.count >= width ? s : String(repeating: " ", count: width - s.count) + s
    }

    private static func rounded(_ value: Double, places: Int) -> Double {
        var scale = 1.0
        for _ in 0..<places { scale *= 10 }
        return (value * scale).rounded() / scale
    }

    /// `value` with exactly `places` decimals, without Foundation.
    static func fixed(_ value: Double, _ places: Int) -> String {
        guard value.isFinite else { return String(value) }
        var scale: Int64 = 1
        for _ in 0..<places { scale *= 10 }
        let scaled = Int64((abs(value) * Double(scale)).rounded())
        let whole = scaled / scale
        let fraction = String(scaled % scale)
        let sign = value < 0 && scaled != 0 ? "-" : ""
        if places == 0 { return sign + String(whole) }
        return sign + String(whole) + "." + String(repeating: "0", count: places - fraction.count) + fraction
    }
}

extension String {
    func padding(_ width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }
}

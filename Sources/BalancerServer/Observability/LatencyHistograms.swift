import Histogram
import Synchronization

/// Queue wait, run time and total time of requests, as HdrHistograms in microseconds.
///
/// Two significant digits (values are exact to within 1%) from 1 µs to an hour
/// keep each histogram at about 25 KB; a longer value is counted as an hour.
struct LatencyHistograms: Sendable {
    static let highestMicroseconds: UInt64 = 3_600_000_000

    var queue = Self.empty()
    var run = Self.empty()
    var total = Self.empty()

    private static func empty() -> Histogram<UInt64> {
        Histogram(lowestDiscernibleValue: 1, highestTrackableValue: highestMicroseconds, numberOfSignificantValueDigits: .two)
    }

    mutating func record(queued: Duration, ran: Duration, total: Duration) {
        queue.record(Self.clamped(queued))
        run.record(Self.clamped(ran))
        self.total.record(Self.clamped(total))
    }

    /// Adds `other`'s counts to these.
    mutating func add(_ other: LatencyHistograms) {
        queue.add(other.queue)
        run.add(other.run)
        total.add(other.total)
    }

    private static func clamped(_ duration: Duration) -> UInt64 {
        UInt64(min(max(duration.microseconds, 0), Int64(highestMicroseconds)))
    }
}

/// What `/stats` shows of a worker's or a pool's ``LatencyHistograms``.
struct LatencySummaries: Sendable, Equatable {
    var queue: LatencySummary
    var run: LatencySummary
    var total: LatencySummary

    init(_ histograms: LatencyHistograms) {
        queue = LatencySummary(histograms.queue)
        run = LatencySummary(histograms.run)
        total = LatencySummary(histograms.total)
    }

    /// All zero: a worker that has served nothing yet.
    static let empty = LatencySummaries(LatencyHistograms())

    /// `{"queue": {...}, "run": {...}, "total": {...}}`, each ``LatencySummary/json``.
    var json: JSONValue {
        .object(JSONObject([("queue", queue.json), ("run", run.json), ("total", total.json)]))
    }
}

/// Count, p50, p90, p99 and max of one histogram, in whole microseconds.
///
/// The percentiles are HdrHistogram's (the highest value equivalent to the
/// percentile's bucket), capped at the largest value recorded, so
/// p50 <= p90 <= p99 <= max always holds.
struct LatencySummary: Sendable, Equatable {
    var count: UInt64
    var p50: UInt64
    var p90: UInt64
    var p99: UInt64
    var max: UInt64

    init(_ histogram: Histogram<UInt64>) {
        count = histogram.totalCount
        max = count == 0 ? 0 : histogram.maxRecorded
        let max = self.max
        func at(_ percentile: Double) -> UInt64 { Swift.min(histogram.valueAtPercentile(percentile), max) }
        p50 = at(50)
        p90 = at(90)
        p99 = at(99)
    }

    var json: JSONValue {
        .object(
            JSONObject([
                ("count", JSONValue(Int(count))), ("p50", JSONValue(Int(p50))), ("p90", JSONValue(Int(p90))),
                ("p99", JSONValue(Int(p99))), ("max", JSONValue(Int(max))),
            ])
        )
    }
}

/// The latency histograms of one pool's workers, each behind its own lock, so
/// recording costs one uncontended lock and no allocation.
///
/// Workers `0..<workers` get their slot up front; a worker added later (an id
/// past those) is kept in a shared table until it leaves the pool
/// (``retire(_:)``): then its counts go into the pool's and its histograms
/// are dropped, so adding and removing backends costs no memory per cycle.
final class PoolLatency: Sendable {
    private final class Slot: Sendable {
        let histograms = Mutex(LatencyHistograms())
    }

    private struct Added {
        var workers: [Int: LatencyHistograms] = [:]
        /// What retired workers recorded: still the pool's, no longer any worker's.
        var retired = LatencyHistograms()
        /// Ids are never reused; a request a retired worker finished is
        /// recorded after the worker left, and goes to ``retired``.
        var retiredIDs: Set<Int> = []
    }

    private let slots: [Slot]
    private let added = Mutex(Added())

    init(workers: Int) {
        slots = (0..<workers).map { _ in Slot() }
    }

    func record(worker: Int, queued: Duration, ran: Duration, total: Duration) {
        if worker >= 0 && worker < slots.count {
            slots[worker].histograms.withLock { $0.record(queued: queued, ran: ran, total: total) }
        } else {
            added.withLock { added in
                if added.retiredIDs.contains(worker) {
                    added.retired.record(queued: queued, ran: ran, total: total)
                } else {
                    added.workers[worker, default: LatencyHistograms()].record(queued: queued, ran: ran, total: total)
                }
            }
        }
    }

    /// Workers `ids` have left the pool: their histograms are dropped, their
    /// counts stay in the pool's. (A worker with a slot keeps it: slots are
    /// fixed.)
    func retire(_ ids: some Sequence<Int>) {
        added.withLock { added in
            for id in ids where id >= slots.count {
                added.retiredIDs.insert(id)
                if let histograms = added.workers.removeValue(forKey: id) { added.retired.add(histograms) }
            }
        }
    }

    /// Each worker's summaries (by worker id) and the pool's.
    ///
    /// Read under each worker's lock, without copying its histograms (a copy
    /// would make the recording side copy its arrays on its next write); the
    /// pool's are summed into one fresh set.
    func snapshot() -> StatsRendering.Latency {
        var workers: [Int: LatencySummaries] = [:]
        var pool = LatencyHistograms()
        for (id, slot) in slots.enumerated() {
            workers[id] = slot.histograms.withLock { histograms in
                pool.add(histograms)
                return LatencySummaries(histograms)
            }
        }
        added.withLock { added in
            pool.add(added.retired)
            for (id, histograms) in added.workers {
                pool.add(histograms)
                workers[id] = LatencySummaries(histograms)
            }
        }
        return (workers, LatencySummaries(pool))
    }
}

import BalancerCore
import CoreMetrics
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization

/// Which pool answered a request, the `pool` label of the metrics and the
/// access log: `jobs`, `server` (the server's own routes: `/stats`,
/// `/metrics`, health, unknown paths), or an upstream pool's name (the quick
/// start's pool is `upstream`).
struct PoolName: Hashable, Sendable {
    let rawValue: String

    /// `POST /jobs`: the jobs' balancer.
    static let jobs = PoolName(rawValue: "jobs")
    /// The server's own routes.
    static let server = PoolName(rawValue: "server")
    /// Names an upstream pool may not take: they are the labels above.
    static let reserved: Set<String> = [jobs.rawValue, server.rawValue]
}

/// The metrics of one server: its own Prometheus registry (tests run many
/// servers in one process, so nothing goes through the global
/// `MetricsSystem`), per-pool latency histograms for `/stats`, and `/metrics`.
///
/// Per request, only what cannot be read later is updated: the HdrHistograms
/// of the worker, the pool's Prometheus histograms and a status-class counter,
/// all resolved up front. Pending, backlog depth and the balancer's own
/// counters are read from its stats snapshot when `/metrics` is scraped.
final class ServerMetrics: Sendable {
    /// The Prometheus text format's media type.
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    /// Histogram buckets for queue wait, run time and total, from 50 µs to 10 s.
    static let buckets: [Duration] = [
        .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1),
        .microseconds(2_500), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2_500), .seconds(5),
        .seconds(10),
    ]

    let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory
    let jobs: PoolMetrics
    /// The upstream pools', by name.
    let upstreams: [PoolName: PoolMetrics]
    /// Answers by status class: index 0 is 2xx, ..., 3 is 5xx (1xx is never
    /// final). The jobs' and the server's are kept apart, so the jobs' path
    /// looks nothing up by name.
    private let jobsAnswers: [CoreMetrics.Counter]
    private let serverAnswers: [CoreMetrics.Counter]
    /// The upstream pools' answers, by pool.
    private let upstreamAnswers: [PoolName: [CoreMetrics.Counter]]
    /// The balancer counters last exported, per pool: `/metrics` adds what they grew since.
    private let exported = Mutex<[PoolName: ExportedCounts]>([:])
    /// Access-log lines dropped, as last exported.
    private let exportedAccessLogDrops = Mutex(0)
    /// Connections closed by the send timeout, as last exported.
    private let exportedSendTimeouts = Mutex(0)

    private struct ExportedCounts {
        var overloaded = 0
        var queueTimeouts = 0
        /// The pending gauge of each worker exported, by worker id, with its backend.
        var pending: [Int: (backend: String?, gauge: CoreMetrics.Gauge)] = [:]
    }

    /// - Parameters:
    ///   - workers: workers of the jobs' pool.
    ///   - upstreams: each upstream pool's name and workers at start.
    init(workers: Int, upstreams: [(name: PoolName, workers: Int)]) {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = Self.buckets
        self.factory = factory
        jobs = PoolMetrics(.jobs, workers: workers, factory: factory)
        self.upstreams = Dictionary(uniqueKeysWithValues: upstreams.map { ($0.name, PoolMetrics($0.name, workers: $0.workers, factory: factory)) })
        func answers(_ pool: PoolName) -> [CoreMetrics.Counter] {
            (2...5).map { statusClass in
                CoreMetrics.Counter(
                    label: "balancer_requests_total", dimensions: [("pool", pool.rawValue), ("class", "\(statusClass)xx")],
                    factory: factory)
            }
        }
        jobsAnswers = answers(.jobs)
        serverAnswers = answers(.server)
        upstreamAnswers = Dictionary(uniqueKeysWithValues: upstreams.map { ($0.name, answers($0.name)) })
    }

    /// The timed pool `name`, if the server has it.
    func pool(_ name: PoolName) -> PoolMetrics? {
        name == .jobs ? jobs : upstreams[name]
    }

    /// One answer of pool `pool`, by its status class.
    func count(_ status: HTTPResponseStatus, pool: PoolName) {
        guard let counters = pool == .jobs ? jobsAnswers : pool == .server ? serverAnswers : upstreamAnswers[pool]
        else { return }
        counters[min(max(Int(status.code) / 100 - 2, 0), 3)].increment()
    }

    /// An upstream pool's name, balancer snapshot, and the backend of each worker.
    typealias UpstreamSnapshot = (name: PoolName, stats: BalancerStats, backendOf: (Int) -> String?)

    /// The Prometheus text for `/metrics`: first the figures read from the
    /// pools' snapshots, the connections' send timeouts, and the access log's
    /// drops when it is on.
    func render(jobs jobsStats: BalancerStats, upstreams: [UpstreamSnapshot], sendTimeouts: Int, accessLogDropped: Int? = nil)
        -> ByteBuffer
    {
        export(jobsStats, pool: .jobs, backendOf: { _ in nil })
        for upstream in upstreams { export(upstream.stats, pool: upstream.name, backendOf: upstream.backendOf) }
        export(total: sendTimeouts, as: "balancer_send_timeouts_total", exported: exportedSendTimeouts)
        if let accessLogDropped {
            export(total: accessLogDropped, as: "balancer_access_log_dropped_total", exported: exportedAccessLogDrops)
        }
        var bytes: [UInt8] = []
        registry.emit(into: &bytes)
        return ByteBuffer(bytes: bytes)
    }

    /// Adds to counter `label` what `total`, counted elsewhere, grew since it
    /// was last exported (under the lock, so two scrapes at once add it once).
    private func export(total: Int, as label: String, exported: borrowing Mutex<Int>) {
        let counter = CoreMetrics.Counter(label: label, factory: factory)
        exported.withLock { exported in
            counter.increment(by: max(total - exported, 0))
            exported = max(total, exported)
        }
    }

    /// Sets the pool's gauges and adds to its counters from `stats`. A worker
    /// that has left the pool (a backend removed at run time) loses its
    /// pending gauge, so the gauges always sum to the pool's pending.
    private func export(_ stats: BalancerStats, pool: PoolName, backendOf: (Int) -> String?) {
        let label = ("pool", pool.rawValue)
        CoreMetrics.Gauge(label: "balancer_backlog_depth", dimensions: [label], factory: factory).record(stats.backlogDepth)
        CoreMetrics.Gauge(label: "balancer_in_flight", dimensions: [label], factory: factory).record(stats.inFlight)
        let overloaded = CoreMetrics.Counter(label: "balancer_overloaded_total", dimensions: [label], factory: factory)
        let timeouts = CoreMetrics.Counter(label: "balancer_queue_timeouts_total", dimensions: [label], factory: factory)
        // Under the lock, so two scrapes at once add each increase once.
        exported.withLock { exported in
            var counts = exported[pool] ?? ExportedCounts()
            overloaded.increment(by: max(stats.overloaded - counts.overloaded, 0))
            timeouts.increment(by: max(stats.queueTimeouts - counts.queueTimeouts, 0))
            counts.overloaded = max(stats.overloaded, counts.overloaded)
            counts.queueTimeouts = max(stats.queueTimeouts, counts.queueTimeouts)
            var pending: [Int: (backend: String?, gauge: CoreMetrics.Gauge)] = [:]
            for worker in stats.workers {
                let backend = backendOf(worker.id)
                var entry = counts.pending.removeValue(forKey: worker.id)
                if let old = entry, old.backend != backend {
                    old.gauge.destroy()
                    entry = nil
                }
                let gauge =
                    entry?.gauge
                    ?? CoreMetrics.Gauge(
                        label: "balancer_worker_pending",
                        dimensions: [label, ("worker", String(worker.id))] + (backend.map { [("backend", $0)] } ?? []),
                        factory: factory)
                gauge.record(worker.pending)
                pending[worker.id] = (backend, gauge)
            }
            for gone in counts.pending.values { gone.gauge.destroy() }
            counts.pending = pending
            exported[pool] = counts
        }
    }
}

/// The per-request timings of one pool, resolved once.
final class PoolMetrics: Sendable {
    let name: PoolName
    /// Per-worker HdrHistograms, for `/stats`.
    let latency: PoolLatency
    private let queueWait: CoreMetrics.Timer
    private let runTime: CoreMetrics.Timer
    private let totalTime: CoreMetrics.Timer

    init(_ name: PoolName, workers: Int, factory: PrometheusMetricsFactory) {
        self.name = name
        latency = PoolLatency(workers: workers)
        let label = [("pool", name.rawValue)]
        queueWait = CoreMetrics.Timer(label: "balancer_queue_wait_seconds", dimensions: label, factory: factory)
        runTime = CoreMetrics.Timer(label: "balancer_run_seconds", dimensions: label, factory: factory)
        totalTime = CoreMetrics.Timer(label: "balancer_request_duration_seconds", dimensions: label, factory: factory)
    }

    /// One request a worker served.
    func record(worker: Int, queued: Duration, ran: Duration, total: Duration) {
        latency.record(worker: worker, queued: queued, ran: ran, total: total)
        queueWait.recordNanoseconds(queued.nanoseconds)
        runTime.recordNanoseconds(ran.nanoseconds)
        totalTime.recordNanoseconds(total.nanoseconds)
    }
}

extension Duration {
    /// Whole nanoseconds (saturating past about 292 years).
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (whole, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        return overflow ? (seconds < 0 ? .min : .max) : whole &+ attoseconds / 1_000_000_000
    }
}

import BalancerCore
import Logging

/// Everything `balancer serve` can be told, with the documented defaults.
///
/// Values come from four layers; the first that names a key wins: command-line
/// flags, then `BALANCER_*` environment variables, then a JSON file, then these
/// defaults (see ``load(flags:environment:file:)``). Each key has one snake_case
/// name used in the file, one environment variable and one flag.
public struct ServerConfiguration: Sendable, Equatable {
    /// Address to listen on. `0.0.0.0` inside a container.
    public var host = "127.0.0.1"
    /// Port to listen on; 0 picks a free one (tests).
    public var port = 8080
    /// Workers in the pool.
    public var workers = 8
    /// C: the most requests queued on or running on one worker.
    public var capacity = 16
    /// Q: requests that may wait for a worker with room before 503 `overloaded`.
    public var backlog = 1024
    /// T: the longest a request waits in the backlog before 503 `queue_timeout`.
    public var queueTimeoutMilliseconds: Int64 = 5_000
    /// How the balancer picks a worker.
    public var strategy = Strategy.leastLoaded
    /// Lowest level logged to stderr.
    public var logLevel = Logger.Level.info
    /// The most `ms` a `sleep` or `spin` job may ask for.
    public var maxJobMilliseconds: Int64 = 10_000
    /// Largest request body accepted; larger ones get 413.
    public var maxBodyBytes = 1_048_576
    /// Largest request head (request line and headers) accepted; larger get 431.
    public var maxHeaderBytes = 16_384
    /// Most connections open at once; more are answered 503 and closed.
    public var maxConnections = 1_000
    /// A request's head must arrive within this from its first byte, or 408.
    public var headerTimeoutMilliseconds: Int64 = 10_000
    /// A request's body must arrive within this from the end of its head, or 408.
    public var bodyTimeoutMilliseconds: Int64 = 30_000
    /// A keep-alive connection with no request for this long is closed.
    public var idleTimeoutMilliseconds: Int64 = 60_000
    /// A connection whose client takes none of the bytes waiting to be sent
    /// to it for this long is closed (nginx's `send_timeout`).
    public var sendTimeoutMilliseconds: Int64 = 60_000
    /// On SIGTERM/SIGINT, how long in-flight and queued jobs get to finish
    /// before the rest are answered 503 and the process exits.
    public var gracePeriodMilliseconds: Int64 = 30_000
    /// Event-loop threads for the network; 0 means one per CPU core.
    public var threads = 0
    /// Backend URLs of the upstream pool (`http://host:port`); empty: no
    /// upstream pool. When set, every path but the server's own goes to them.
    public var upstreams: [String] = []
    /// K: workers per backend, each owning one keep-alive connection (its
    /// connection limit, like HAProxy's per-server `maxconn`).
    public var connectionsPerUpstream = 16
    /// Further tries of a request on another backend's worker after a failure
    /// that allows it (refused, reset before sending; idempotent after).
    public var upstreamRetries = 2
    /// Consecutive failures that eject a backend (nginx's `max_fails`).
    public var upstreamMaxFails = 1
    /// How long an ejected backend stays out (nginx's `fail_timeout`).
    public var upstreamFailTimeoutMilliseconds: Int64 = 10_000
    /// A connect to a backend must finish within this (504 after).
    public var upstreamConnectTimeoutMilliseconds: Int64 = 3_000
    /// A backend's response head must arrive within this after the request (504 after).
    public var upstreamResponseTimeoutMilliseconds: Int64 = 30_000
    /// Hedging: a copy of an idempotent request goes to another backend when
    /// no response head has come this long after the last copy started; 0: off.
    public var upstreamHedgeAfterMilliseconds: Int64 = 0
    /// Hedging: most copies of one request in all, the first included.
    public var upstreamHedgeMax = 2
    /// Hedging: copies per 100 requests that could be hedged, at most.
    public var upstreamHedgeBudgetPercent = 10
    /// Hedging: when above 0, the delay is this percentile of the pool's
    /// recent response times, at least `upstreamHedgeAfterMilliseconds`.
    public var upstreamHedgeAfterPercentile = 0
    /// Hedging: a losing copy's response is read and thrown away for up to
    /// this long, and its connection kept; 0: the loser's connection is
    /// closed at once (and replaced).
    public var upstreamHedgeLoserFinishMilliseconds: Int64 = 0
    /// Most copies a client may ask for with `X-Balancer-Replicas` (more are
    /// capped to this); 1 forbids the header (400).
    public var upstreamMaxReplicas = 2
    /// Latency histograms in `/stats` and `GET /metrics`; off, neither is
    /// recorded (for measuring what they cost).
    public var metrics = true
    /// One JSON line per answered request on standard output.
    public var accessLog = false
    /// Pools with routes, from the config file (see ``PoolConfiguration``);
    /// empty: the jobs pool and the default upstream pool of `upstreams`
    /// (``effectivePools``).
    public var pools: [PoolConfiguration] = []
    /// A second listener, on the same host, for the admin paths (`/stats`,
    /// `/healthz`, `/readyz`, `/metrics`, `/dashboard`, `/admin/...`); the main
    /// port then serves only the pools. `nil`: admin paths on the main port.
    public var adminPort: Int?

    public init() {}

    /// The balancer's part of the configuration.
    public var balancer: Balancer.Configuration {
        Balancer.Configuration(
            workers: workers,
            capacity: capacity,
            backlog: backlog,
            queueTimeout: .milliseconds(queueTimeoutMilliseconds),
            strategy: strategy
        )
    }

    /// The pools as the server runs them: `pools` when given; otherwise the
    /// jobs pool and, with `upstreams`, one default upstream pool (no route:
    /// every other path) named `upstream`, whose backends are `backend1`,
    /// `backend2`, ... with the `upstream_*` settings and `strategy`.
    public var effectivePools: [PoolConfiguration] {
        if !pools.isEmpty {
            return pools.map { pool in
                var pool = pool
                if pool.kind == .upstream && pool.hedging == nil { pool.hedging = upstreamHedging }
                return pool
            }
        }
        var result = [PoolConfiguration(name: "jobs", kind: .jobs)]
        if !upstreams.isEmpty {
            var pool = PoolConfiguration(
                name: "upstream",
                backends: upstreams.enumerated().map { index, url in
                    BackendConfiguration(name: "backend\(index + 1)", url: url, connections: connectionsPerUpstream)
                }
            )
            pool.retries = upstreamRetries
            pool.maxFails = upstreamMaxFails
            pool.failTimeoutMilliseconds = upstreamFailTimeoutMilliseconds
            pool.connectTimeoutMilliseconds = upstreamConnectTimeoutMilliseconds
            pool.responseTimeoutMilliseconds = upstreamResponseTimeoutMilliseconds
            pool.strategy = strategy
            pool.hedging = upstreamHedging
            result.append(pool)
        }
        return result
    }

    /// The jobs' part of the configuration.
    public var jobLimits: JobLimits { JobLimits(maxJobMilliseconds: maxJobMilliseconds) }
}

extension Logger.Level {
    /// The accepted spellings: trace, debug, info, notice, warning, error, critical.
    static let names: [String] = Logger.Level.allCases.map(\.rawValue)
}

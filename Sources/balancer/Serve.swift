import ArgumentParser
import BalancerCore
import BalancerServer
import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle

/// `balancer serve`: the HTTP daemon.
///
/// Reads the configuration from its four layers, binds, then runs the
/// balancer and the server in one `ServiceGroup` that drains on SIGTERM/SIGINT.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the HTTP load balancer: POST /jobs, GET /stats, /healthz, /readyz.",
        discussion: """
            Settings come from four layers; the first that names a key wins: these flags, then BALANCER_* \
            environment variables (BALANCER_PORT, ...), then the JSON file given by --config or BALANCER_CONFIG, \
            then the defaults. --print-config shows the result. SIGTERM or SIGINT drains: in-flight and queued \
            jobs finish (within --grace-period-ms), then the process exits 0.
            """
    )

    @Option(name: .long, help: ArgumentHelp("JSON configuration file (see config/).", valueName: "file"))
    var config: String?

    @Flag(name: .long, help: "Print the effective configuration as JSON and exit.")
    var printConfig = false

    @Option(help: "Address to listen on. [default: 127.0.0.1]") var host: String?
    @Option(help: "TCP port (0 picks a free one). [default: 8080]") var port: String?
    @Option(help: "Workers in the pool. [default: 8]") var workers: String?
    @Option(help: "Requests queued or running on one worker, at most (C). [default: 16]") var capacity: String?
    @Option(help: "Requests waiting for a worker, at most (Q). [default: 1024]") var backlog: String?
    @Option(help: "Longest wait in the backlog, ms (T). [default: 5000]") var queueTimeoutMs: String?
    @Option(help: "Worker choice: \(Strategy.allCases.map(\.rawValue).joined(separator: ", ")). [default: least-loaded]")
    var strategy: String?
    @Option(help: "trace, debug, info, notice, warning, error, critical. [default: info]") var logLevel: String?
    @Option(help: "Most ms a sleep or spin job may ask for. [default: 10000]") var maxJobMs: String?
    @Option(help: "Largest request body, bytes (413 above). [default: 1048576]") var maxBodyBytes: String?
    @Option(help: "Largest request head, bytes (431 above). [default: 16384]") var maxHeaderBytes: String?
    @Option(help: "Most open connections. [default: 1000]") var maxConnections: String?
    @Option(help: "Time to receive a request head, ms (408 after). [default: 10000]") var headerTimeoutMs: String?
    @Option(help: "Time to receive a request body, ms (408 after). [default: 30000]") var bodyTimeoutMs: String?
    @Option(help: "Idle keep-alive connections close after this, ms. [default: 60000]") var idleTimeoutMs: String?
    @Option(help: "A client that takes none of its response for this long is disconnected, ms. [default: 60000]")
    var sendTimeoutMs: String?
    @Option(help: "On SIGTERM, time for jobs to finish, ms. [default: 30000]") var gracePeriodMs: String?
    @Option(help: "Network event-loop threads; 0 = one per core. [default: 0]") var threads: String?
    @Option(
        name: .customLong("upstream"),
        help: ArgumentHelp("A backend URL (http://host:port); repeat for several. Every path but the server's own is proxied to them.", valueName: "url"))
    var upstreams: [String] = []
    @Option(help: "K: workers (keep-alive connections) per backend. [default: 16]") var connectionsPerUpstream: String?
    @Option(help: "Further tries on another backend after a retryable failure. [default: 2]") var upstreamRetries: String?
    @Option(help: "Copy an idempotent request to another backend after this long without a response head, ms; 0 = off. [default: 0]")
    var upstreamHedgeAfterMs: String?
    @Option(help: "Most copies of one hedged request, the first included. [default: 2]") var upstreamHedgeMax: String?
    @Option(help: "Hedge copies per 100 requests that could be hedged, at most. [default: 10]")
    var upstreamHedgeBudgetPercent: String?
    @Option(help: "Hedge after this percentile of the pool's recent response times (at least --upstream-hedge-after-ms); 0 = off. [default: 0]")
    var upstreamHedgeAfterPercentile: String?
    @Option(help: "Let a losing hedge copy finish for up to this long (its response thrown away, its connection kept), ms; 0 = close its connection at once. [default: 0]")
    var upstreamHedgeLoserFinishMs: String?
    @Option(help: "Most copies X-Balancer-Replicas may ask for; 1 forbids the header. [default: 2]")
    var upstreamMaxReplicas: String?
    @Flag(inversion: .prefixedNo, help: "Latency histograms in /stats and GET /metrics. [default: on]") var metrics: Bool?
    @Flag(inversion: .prefixedNo, help: "One JSON line per answered request on stdout. [default: off]") var accessLog: Bool?
    @Option(help: ArgumentHelp("Pools with routes and backends, as the config file's \"pools\" JSON array (see config/upstream-pools.json).", valueName: "json"))
    var pools: String?
    @Option(help: "Port of a second listener for /stats, /healthz, /readyz, /metrics, /dashboard and /admin/...; the main port then only proxies. [default: none]")
    var adminPort: String?

    /// The flags given, by configuration key name.
    private var flags: [String: String] {
        let pairs: [(String, String?)] = [
            ("host", host), ("port", port), ("workers", workers), ("capacity", capacity), ("backlog", backlog),
            ("queue_timeout_ms", queueTimeoutMs), ("strategy", strategy), ("log_level", logLevel),
            ("max_job_ms", maxJobMs), ("max_body_bytes", maxBodyBytes), ("max_header_bytes", maxHeaderBytes),
            ("max_connections", maxConnections), ("header_timeout_ms", headerTimeoutMs),
            ("body_timeout_ms", bodyTimeoutMs), ("idle_timeout_ms", idleTimeoutMs),
            ("send_timeout_ms", sendTimeoutMs),
            ("grace_period_ms", gracePeriodMs), ("threads", threads),
            ("upstreams", upstreams.isEmpty ? nil : upstreams.joined(separator: ",")),
            ("connections_per_upstream", connectionsPerUpstream), ("upstream_retries", upstreamRetries),
            ("upstream_hedge_after_ms", upstreamHedgeAfterMs), ("upstream_hedge_max", upstreamHedgeMax),
            ("upstream_hedge_budget_percent", upstreamHedgeBudgetPercent),
            ("upstream_hedge_after_percentile", upstreamHedgeAfterPercentile),
            ("upstream_hedge_loser_finish_ms", upstreamHedgeLoserFinishMs),
            ("upstream_max_replicas", upstreamMaxReplicas),
            ("metrics", metrics.map { String($0) }), ("access_log", accessLog.map { String($0) }),
            ("pools", pools), ("admin_port", adminPort),
        ]
        var flags: [String: String] = [:]
        for case let (name, value?) in pairs { flags[name] = value }
        return flags
    }

    func run() async throws {
        let configuration: ServerConfiguration
        do {
            configuration = try loadConfiguration(flags: flags, configPath: config)
        } catch {
            printError("balancer serve: \(error)")
            throw ExitCode(2)
        }
        if printConfig {
            print(configuration.prettyJSON)
            return
        }

        let level = configuration.logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "balancer")

        let eventLoopGroup: MultiThreadedEventLoopGroup =
            configuration.threads == 0
            ? .singleton : MultiThreadedEventLoopGroup(numberOfThreads: configuration.threads)
        let balancer = Balancer(configuration: configuration.balancer)
        let upstreams: [UpstreamPool]
        do {
            upstreams = try UpstreamPool.pools(of: configuration, eventLoopGroup: eventLoopGroup, logger: logger)
        } catch {
            printError("balancer serve: \(error)")
            throw ExitCode(2)
        }
        let server: HTTPServer
        do {
            server = try await HTTPServer.bind(
                configuration: configuration,
                balancer: balancer,
                upstreams: upstreams,
                eventLoopGroup: eventLoopGroup,
                logger: logger
            )
        } catch {
            printError("balancer serve: \(error)")
            throw ExitCode(1)
        }

        let grace = Duration.milliseconds(configuration.gracePeriodMilliseconds)
        var groupConfiguration = ServiceGroupConfiguration(
            services: server.services(gracePeriod: grace),
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        )
        // Backstop: the server answers 503 and closes at the end of the grace
        // period; if anything still hangs a few seconds later, cancel it all.
        groupConfiguration.maximumGracefulShutdownDuration = grace + .seconds(5)
        groupConfiguration.maximumCancellationDuration = .seconds(2)
        let group = ServiceGroup(configuration: groupConfiguration)
        try await group.run()
        logger.info("stopped")
    }
}

/// Reads the JSON file (from `--config` or `BALANCER_CONFIG`) and applies the layers.
func loadConfiguration(flags: [String: String], configPath: String?) throws -> ServerConfiguration {
    let environment = ProcessInfo.processInfo.environment
    var file: (path: String, contents: ByteBuffer)?
    if let path = configPath ?? environment[ServerConfiguration.configFileVariable], !path.isEmpty {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigurationError("config file \(path): cannot be read (does it exist?)")
        }
        file = (path, ByteBuffer(bytes: data))
    }
    return try ServerConfiguration.load(flags: flags, environment: environment, file: file)
}

/// Writes one line to stderr.
func printError(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

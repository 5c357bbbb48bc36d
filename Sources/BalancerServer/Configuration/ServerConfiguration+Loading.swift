import BalancerCore
import Logging
import NIOCore

/// A configuration value that is missing its key, has a bad value, or names
/// an unknown key. The message names the key and where it came from.
public struct ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension ServerConfiguration {
    /// One configuration key: its names in every layer and how to set it.
    public struct Key: Sendable {
        /// Name in the JSON file and in `--print-config`.
        public let name: String
        /// What it does, with its unit.
        public let help: String
        fileprivate let set: @Sendable (inout ServerConfiguration, RawValue) throws(ConfigurationError) -> Void
        fileprivate let get: @Sendable (ServerConfiguration) -> JSONValue

        /// `BALANCER_` and the name in capitals.
        public var environmentVariable: String { "BALANCER_" + name.uppercased() }
        /// `--` and the name with dashes.
        public var flag: String { "--" + String(name.map { $0 == "_" ? "-" : $0 }) }
    }

    /// A value as a layer gives it: text (flags, environment) or JSON (file).
    fileprivate enum RawValue {
        case text(String)
        case json(JSONValue)
    }

    /// Every key, in the order `--print-config` shows them.
    public static let keys: [Key] = [
        .string("host", "address to listen on (0.0.0.0 for all interfaces)", \.host),
        .int("port", "TCP port to listen on (0 picks a free one)", \.port, range: 0...65_535),
        .int("workers", "workers in the pool", \.workers, range: 1...4_096),
        .int("capacity", "C: most requests queued or running on one worker", \.capacity, range: 1...1_000_000),
        .int("backlog", "Q: requests that may wait for a worker before 503 overloaded", \.backlog, range: 0...10_000_000),
        .int64("queue_timeout_ms", "T: longest wait in the backlog before 503 queue_timeout, ms", \.queueTimeoutMilliseconds, range: 1...86_400_000),
        Key(
            name: "strategy",
            help: "worker choice: " + Strategy.allCases.map(\.rawValue).joined(separator: ", "),
            set: { (config, raw) throws(ConfigurationError) in
                let text = try raw.string("strategy")
                guard let strategy = Strategy(rawValue: text) else {
                    throw ConfigurationError(
                        "strategy: \"\(text)\" is not one of \(Strategy.allCases.map(\.rawValue).joined(separator: ", "))"
                    )
                }
                config.strategy = strategy
            },
            get: { .string($0.strategy.rawValue) }
        ),
        Key(
            name: "log_level",
            help: "lowest level logged to stderr: " + Logger.Level.names.joined(separator: ", "),
            set: { (config, raw) throws(ConfigurationError) in
                let text = try raw.string("log_level")
                guard let level = Logger.Level(rawValue: text.lowercased()) else {
                    throw ConfigurationError("log_level: \"\(text)\" is not one of \(Logger.Level.names.joined(separator: ", "))")
                }
                config.logLevel = level
            },
            get: { .string($0.logLevel.rawValue) }
        ),
        .int64("max_job_ms", "most ms a sleep or spin job may ask for", \.maxJobMilliseconds, range: 0...86_400_000),
        .int("max_body_bytes", "largest request body; larger gets 413", \.maxBodyBytes, range: 0...1 << 30),
        .int("max_header_bytes", "largest request head; larger gets 431", \.maxHeaderBytes, range: 1_024...1 << 20),
        .int("max_connections", "most open connections; more get 503 and are closed", \.maxConnections, range: 1...1_000_000),
        .int64("header_timeout_ms", "a request head must arrive within this from its first byte, or 408, ms", \.headerTimeoutMilliseconds, range: 1...3_600_000),
        .int64("body_timeout_ms", "a request body must arrive within this from its head, or 408, ms", \.bodyTimeoutMilliseconds, range: 1...3_600_000),
        .int64("idle_timeout_ms", "an idle keep-alive connection is closed after this, ms", \.idleTimeoutMilliseconds, range: 1...86_400_000),
        .int64("send_timeout_ms", "a client that takes none of its response for this long is disconnected, ms", \.sendTimeoutMilliseconds, range: 1...3_600_000),
        .int64("grace_period_ms", "on SIGTERM, time for in-flight jobs before the rest get 503, ms", \.gracePeriodMilliseconds, range: 0...3_600_000),
        .int("threads", "network event-loop threads; 0 = one per CPU core", \.threads, range: 0...1_024),
        Key(
            name: "upstreams",
            help: "backend URLs (http://host:port) of the upstream pool; comma-separated in flags and environment",
            set: { (config, raw) throws(ConfigurationError) in
                let urls: [String]
                switch raw {
                case .text(let text):
                    urls = text.split(separator: ",").map { String(String($0).trimmingWhitespace()) }.filter { !$0.isEmpty }
                case .json(.array(let items)):
                    urls = try items.map { (item) throws(ConfigurationError) -> String in
                        guard case .string(let url) = item else {
                            throw ConfigurationError("upstreams: each entry must be a URL string, not \(item.typeName)")
                        }
                        return url
                    }
                case .json(let other):
                    throw ConfigurationError("upstreams: must be an array of URLs, not \(other.typeName)")
                }
                for url in urls {
                    do {
                        _ = try Backend(url: url)
                    } catch {
                        throw ConfigurationError("upstreams: \(error)")
                    }
                }
                config.upstreams = urls
            },
            get: { .array($0.upstreams.map { .string($0) }) }
        ),
        .int("connections_per_upstream", "K: workers (keep-alive connections) per backend", \.connectionsPerUpstream, range: 1...4_096),
        .int("upstream_retries", "further tries on another backend after a retryable failure", \.upstreamRetries, range: 0...16),
        .int("upstream_max_fails", "consecutive failures that eject a backend", \.upstreamMaxFails, range: 1...1_000),
        .int64("upstream_fail_timeout_ms", "how long an ejected backend stays out, ms", \.upstreamFailTimeoutMilliseconds, range: 1...3_600_000),
        .int64("upstream_connect_timeout_ms", "connect timeout to a backend (504 after), ms", \.upstreamConnectTimeoutMilliseconds, range: 1...600_000),
        .int64("upstream_response_timeout_ms", "time for a backend's response head (504 after), ms", \.upstreamResponseTimeoutMilliseconds, range: 1...3_600_000),
        .int64("upstream_hedge_after_ms", "copy an idempotent request to another backend after this long without a response head, ms; 0 = off", \.upstreamHedgeAfterMilliseconds, range: HedgePolicy.afterRange),
        .int("upstream_hedge_max", "most copies of one hedged request, the first included", \.upstreamHedgeMax, range: HedgePolicy.copiesRange),
        .int("upstream_hedge_budget_percent", "hedge copies per 100 requests that could be hedged, at most", \.upstreamHedgeBudgetPercent, range: HedgePolicy.budgetRange),
        .int("upstream_hedge_after_percentile", "hedge after this percentile of the pool's recent response times (at least upstream_hedge_after_ms); 0 = off", \.upstreamHedgeAfterPercentile, range: HedgePolicy.percentileRange),
        .int64("upstream_hedge_loser_finish_ms", "let a losing copy finish for up to this long, its response thrown away, and keep its connection, ms; 0 = close it at once", \.upstreamHedgeLoserFinishMilliseconds, range: HedgePolicy.afterRange),
        .int("upstream_max_replicas", "most copies X-Balancer-Replicas may ask for (capped above); 1 forbids the header", \.upstreamMaxReplicas, range: HedgePolicy.copiesRange),
        .bool("metrics", "latency histograms in /stats and GET /metrics (off: not recorded)", \.metrics),
        .bool("access_log", "one JSON line per answered request on stdout", \.accessLog),
        Key(
            name: "pools",
            help: "pools with routes and backends (a JSON array; see config/upstream-pools.json); replaces upstreams",
            set: { (config, raw) throws(ConfigurationError) in
                let json: JSONValue
                switch raw {
                case .json(let value): json = value
                case .text(let text):
                    do {
                        json = try JSONParser.parse(ByteBuffer(string: text))
                    } catch {
                        throw ConfigurationError("pools: not valid JSON: \(error)")
                    }
                }
                guard case .array(let items) = json else {
                    throw ConfigurationError("pools: must be an array of pool objects, not \(json.typeName)")
                }
                var pools: [PoolConfiguration] = []
                for (index, item) in items.enumerated() {
                    pools.append(try PoolConfiguration(json: item, path: "pools[\(index)]"))
                }
                config.pools = pools
            },
            get: { .array($0.pools.map(\.json)) }
        ),
        Key(
            name: "admin_port",
            help: "port of a second listener for /stats, /healthz, /readyz, /metrics, /dashboard, /admin/ (then the main port only proxies); null: admin paths on the main port",
            set: { (config, raw) throws(ConfigurationError) in
                if case .json(.null) = raw {
                    config.adminPort = nil
                } else {
                    config.adminPort = Int(try raw.int64("admin_port", range: 0...65_535))
                }
            },
            get: { $0.adminPort.map { JSONValue($0) } ?? .null }
        ),
    ]

    /// The environment variable that names the JSON file, like `--config`.
    public static let configFileVariable = "BALANCER_CONFIG"

    /// Builds the configuration from its four layers.
    ///
    /// - Parameters:
    ///   - flags: key name → value given on the command line (highest).
    ///   - environment: the process environment; `BALANCER_*` variables are read.
    ///   - file: the JSON file's bytes and its path (for messages), if any.
    /// - Throws: ``ConfigurationError`` naming the key for an unknown key, a bad
    ///   value or an unreadable file.
    public static func load(
        flags: [String: String] = [:],
        environment: [String: String] = [:],
        file: (path: String, contents: ByteBuffer)? = nil
    ) throws(ConfigurationError) -> ServerConfiguration {
        var config = ServerConfiguration()
        let byName = Dictionary(uniqueKeysWithValues: keys.map { ($0.name, $0) })

        if let file {
            let json: JSONValue
            do {
                json = try JSONParser.parse(file.contents)
            } catch {
                throw ConfigurationError("\(file.path): not valid JSON: \(error)")
            }
            guard case .object(let object) = json else {
                throw ConfigurationError("\(file.path): must be a JSON object of settings, not \(json.typeName)")
            }
            for member in object.members {
                guard let key = byName[member.key] else {
                    throw ConfigurationError(
                        "\(file.path): unknown key \"\(member.key)\"; known keys: \(keys.map(\.name).joined(separator: ", "))"
                    )
                }
                do {
                    try key.set(&config, .json(member.value))
                } catch {
                    throw ConfigurationError("\(file.path): \(error.message)")
                }
            }
        }

        let knownVariables = Dictionary(uniqueKeysWithValues: keys.map { ($0.environmentVariable, $0) })
        for (variable, value) in environment.sorted(by: { $0.key < $1.key }) where variable.hasPrefix("BALANCER_") {
            if variable == configFileVariable { continue }
            guard let key = knownVariables[variable] else {
                throw ConfigurationError(
                    "environment variable \(variable) is not a setting; known: "
                        + keys.map(\.environmentVariable).joined(separator: ", ")
                )
            }
            do {
                try key.set(&config, .text(value))
            } catch {
                throw ConfigurationError("\(variable): \(error.message.droppingPrefix(key.name + ": "))")
            }
        }

        for (name, value) in flags.sorted(by: { $0.key < $1.key }) {
            guard let key = byName[name] else { throw ConfigurationError("unknown setting \"\(name)\"") }
            do {
                try key.set(&config, .text(value))
            } catch {
                throw ConfigurationError("\(key.flag): \(error.message.droppingPrefix(key.name + ": "))")
            }
        }
        let problems = config.balancer.problems + config.poolProblems
        if !problems.isEmpty { throw ConfigurationError(problems.joined(separator: "; ")) }
        return config
    }

    /// What is wrong with the pools and ports taken together, each naming the keys.
    private var poolProblems: [String] {
        var problems: [String] = []
        if !pools.isEmpty && !upstreams.isEmpty {
            problems.append("upstreams and pools: give the backends either as upstreams (one default pool) or in pools, not both")
        }
        if let adminPort, adminPort != 0, adminPort == port {
            problems.append("admin_port: \(adminPort) is also the main port; pick another")
        }
        var names: Set<String> = []
        var routes: [String?: String] = [:]
        var backendNames: [String: String] = [:]
        for pool in pools {
            if !names.insert(pool.name).inserted { problems.append("pools: two pools are named \"\(pool.name)\"") }
            if pool.kind == .upstream && PoolName.reserved.contains(pool.name) {
                problems.append("pools: an upstream pool may not be named \"\(pool.name)\" (a metrics label of its own)")
            }
            if let other = routes.updateValue(pool.name, forKey: pool.effectiveRoute) {
                let route = pool.effectiveRoute.map { "route \"\($0)\"" } ?? "no route (the default pool)"
                problems.append("pools: \"\(other)\" and \"\(pool.name)\" both have \(route)")
            }
            for backend in pool.backends {
                if let other = backendNames.updateValue(pool.name, forKey: backend.name) {
                    problems.append("pools: backend name \"\(backend.name)\" is used twice (pools \"\(other)\" and \"\(pool.name)\")")
                }
            }
        }
        return problems
    }

    /// The effective configuration as a JSON object, usable as a config file.
    public var json: JSONValue {
        .object(JSONObject(Self.keys.map { (key: $0.name, value: $0.get(self)) }))
    }

    /// The effective configuration as pretty JSON text, one key a line.
    public var prettyJSON: String {
        let lines = Self.keys.map { key in "  \(JSONValue.string(key.name)): \(key.get(self))" }
        return "{\n" + lines.joined(separator: ",\n") + "\n}"
    }
}

extension ServerConfiguration.RawValue {
    fileprivate func string(_ name: String) throws(ConfigurationError) -> String {
        switch self {
        case .text(let text): return text
        case .json(.string(let text)): return text
        case .json(let other): throw ConfigurationError("\(name): must be a string, not \(other.typeName)")
        }
    }

    fileprivate func bool(_ name: String) throws(ConfigurationError) -> Bool {
        switch self {
        case .text(let text):
            switch text.trimmingWhitespace().lowercased() {
            case "true", "1", "yes", "on": return true
            case "false", "0", "no", "off": return false
            default: throw ConfigurationError("\(name): \"\(text)\" is not true or false")
            }
        case .json(.bool(let value)): return value
        case .json(let other): throw ConfigurationError("\(name): must be true or false, not \(other.typeName)")
        }
    }

    fileprivate func int64(_ name: String, range: ClosedRange<Int64>) throws(ConfigurationError) -> Int64 {
        switch self {
        case .text(let text):
            guard let value = Int64(text.trimmingWhitespace()) else {
                throw ConfigurationError("\(name): \"\(text)\" is not a whole number")
            }
            return try JSONValue(value).configInt64(name, range: range)
        case .json(let json):
            return try json.configInt64(name, range: range)
        }
    }
}

extension String {
    fileprivate func droppingPrefix(_ prefix: String) -> String {
        hasPrefix(prefix) ? String(dropFirst(prefix.count)) : self
    }

    fileprivate func trimmingWhitespace() -> Substring {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else {
            return ""
        }
        return self[first...last]
    }
}

extension ServerConfiguration.Key {
    fileprivate static func string(
        _ name: String,
        _ help: String,
        _ path: WritableKeyPath<ServerConfiguration, String> & Sendable
    ) -> Self {
        Self(
            name: name,
            help: help,
            set: { (config, raw) throws(ConfigurationError) in
                let text = try raw.string(name)
                guard !text.isEmpty else { throw ConfigurationError("\(name): must not be empty") }
                config[keyPath: path] = text
            },
            get: { .string($0[keyPath: path]) }
        )
    }

    fileprivate static func int(
        _ name: String,
        _ help: String,
        _ path: WritableKeyPath<ServerConfiguration, Int> & Sendable,
        range: ClosedRange<Int>
    ) -> Self {
        Self(
            name: name,
            help: help,
            set: { (config, raw) throws(ConfigurationError) in
                let value = try raw.int64(name, range: Int64(range.lowerBound)...Int64(range.upperBound))
                config[keyPath: path] = Int(value)
            },
            get: { JSONValue($0[keyPath: path]) }
        )
    }

    fileprivate static func bool(
        _ name: String,
        _ help: String,
        _ path: WritableKeyPath<ServerConfiguration, Bool> & Sendable
    ) -> Self {
        Self(
            name: name,
            help: help,
            set: { (config, raw) throws(ConfigurationError) in
                config[keyPath: path] = try raw.bool(name)
            },
            get: { .bool($0[keyPath: path]) }
        )
    }

    fileprivate static func int64(
        _ name: String,
        _ help: String,
        _ path: WritableKeyPath<ServerConfiguration, Int64> & Sendable,
        range: ClosedRange<Int64>
    ) -> Self {
        Self(
            name: name,
            help: help,
            set: { (config, raw) throws(ConfigurationError) in
                config[keyPath: path] = try raw.int64(name, range: range)
            },
            get: { JSONValue($0[keyPath: path]) }
        )
    }
}

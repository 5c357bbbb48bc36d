import BalancerCore

/// One entry of the `pools` list: a set of workers with a route.
///
/// An `upstream` pool proxies the paths its `route` prefix matches (the pool
/// without a route takes every path no other route does) to its backends; the
/// `jobs` pool answers `POST /jobs` with the top-level `workers` and
/// `capacity`. Each field is one entry in ``keys``, so a new field is one
/// property and one line there.
public struct PoolConfiguration: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        case upstream
        case jobs
    }

    /// Unique among the pools; used in `/stats`, logs and the admin API.
    public var name = ""
    public var kind = Kind.upstream
    /// Path prefix this pool serves; the longest matching prefix wins. `nil`
    /// for an upstream pool: every path no other route takes. A jobs pool's
    /// route is always ``jobsRoute``.
    public var route: String?
    public var backends: [BackendConfiguration] = []
    /// Active health checks of every backend; `nil`: none (passive only).
    public var health: HealthCheckConfiguration?
    /// Further tries on another worker after a retryable failure.
    public var retries = 2
    /// Consecutive failures that eject a backend (nginx's `max_fails`).
    public var maxFails = 1
    /// How long an ejected backend stays out (nginx's `fail_timeout`).
    public var failTimeoutMilliseconds: Int64 = 10_000
    public var connectTimeoutMilliseconds: Int64 = 3_000
    public var responseTimeoutMilliseconds: Int64 = 30_000
    /// How the pool's balancer picks a connection.
    public var strategy = Strategy.leastLoaded
    /// When requests are copied to other backends: the pool's `hedge` object;
    /// `nil` when it has none: the top-level `upstream_hedge_*` and
    /// `upstream_max_replicas` settings (``ServerConfiguration/effectivePools``
    /// fills them in).
    public var hedging: HedgePolicy?

    public init(name: String = "", kind: Kind = .upstream, route: String? = nil, backends: [BackendConfiguration] = []) {
        self.name = name
        self.kind = kind
        self.route = route
        self.backends = backends
    }

    /// The only route of a jobs pool.
    public static let jobsRoute = "/jobs"

    /// The route this pool serves: its own, ``jobsRoute`` for jobs, `nil` for the default upstream pool.
    public var effectiveRoute: String? { kind == .jobs ? Self.jobsRoute : route }

    /// The pool's balancer: one worker per backend connection, each with room
    /// for one request (a connection forwards one at a time; the backlog is
    /// the queue, so no request waits behind a slow one on a connection while
    /// another is free). `backlog` and `queueTimeout` are the server's.
    func balancer(backlog: Int, queueTimeout: Duration) -> Balancer.Configuration {
        Balancer.Configuration(
            workers: backends.reduce(0) { $0 + $1.connections },
            capacity: 1,
            backlog: backlog,
            queueTimeout: queueTimeout,
            strategy: strategy == .sharedQueue ? .leastLoaded : strategy
        )
    }

    /// Every field of a pool object, in the order `--print-config` shows them.
    static let keys: [ObjectKey<PoolConfiguration>] = [
        .string("name", \.name),
        .choice("kind", \.kind),
        .custom(
            "route",
            set: { (pool, json, path) throws(ConfigurationError) in
                let route = try json.configString(path)
                guard route.hasPrefix("/"), !route.contains("?"), !route.contains("#") else {
                    throw ConfigurationError("\(path): \"\(route)\" must be a path prefix starting with / (no query)")
                }
                pool.route = route
            },
            get: { $0.route.map { .string($0) } }
        ),
        .custom(
            "backends",
            set: { (pool, json, path) throws(ConfigurationError) in
                guard case .array(let items) = json else {
                    throw ConfigurationError("\(path): must be an array of backend objects, not \(json.typeName)")
                }
                var backends: [BackendConfiguration] = []
                for (index, item) in items.enumerated() {
                    backends.append(try BackendConfiguration(json: item, path: "\(path)[\(index)]"))
                }
                pool.backends = backends
            },
            get: { .array($0.backends.map(\.json)) }
        ),
        .custom(
            "health",
            set: { (pool, json, path) throws(ConfigurationError) in
                pool.health = try ObjectKey.decode(json, keys: HealthCheckConfiguration.keys, into: HealthCheckConfiguration(), path: path)
            },
            get: { $0.health.map { ObjectKey.encode($0, keys: HealthCheckConfiguration.keys) } }
        ),
        .int("retries", \.retries, range: 0...16),
        .int("max_fails", \.maxFails, range: 1...1_000),
        .int64("fail_timeout_ms", \.failTimeoutMilliseconds, range: 1...3_600_000),
        .int64("connect_timeout_ms", \.connectTimeoutMilliseconds, range: 1...600_000),
        .int64("response_timeout_ms", \.responseTimeoutMilliseconds, range: 1...3_600_000),
        .choice("strategy", \.strategy),
        .custom(
            "hedge",
            set: { (pool, json, path) throws(ConfigurationError) in
                pool.hedging = try ObjectKey.decode(
                    json, keys: HedgePolicy.keys, into: ServerConfiguration().upstreamHedging, path: path)
            },
            get: { $0.hedging.map { ObjectKey.encode($0, keys: HedgePolicy.keys) } }
        ),
    ]

    /// Parses one pool object; `path` names it in messages (`pools[1]`).
    init(json: JSONValue, path: String) throws(ConfigurationError) {
        self = try ObjectKey.decode(json, keys: Self.keys, into: PoolConfiguration(), path: path, required: ["name"])
        switch kind {
        case .upstream:
            if backends.isEmpty { throw ConfigurationError("\(path): an upstream pool needs at least one backend in \"backends\"") }
        case .jobs:
            if let route, route != Self.jobsRoute {
                throw ConfigurationError("\(path).route: a jobs pool serves \(Self.jobsRoute), not \(route)")
            }
            if !backends.isEmpty || health != nil {
                throw ConfigurationError("\(path): a jobs pool has no backends or health checks (its workers are the top-level \"workers\")")
            }
            if hedging != nil {
                throw ConfigurationError("\(path).hedge: only an upstream pool's requests are hedged (a job may ask for \"replicas\")")
            }
        }
    }

    /// The pool as a JSON object, usable in a config file.
    var json: JSONValue { ObjectKey.encode(self, keys: Self.keys) }
}

/// One backend of an upstream pool.
public struct BackendConfiguration: Sendable, Equatable {
    /// Unique among every pool's backends; the admin API addresses it by this.
    /// Empty: `host:port`.
    public var name = ""
    /// `http://host[:port]`.
    public var url = ""
    /// K: its workers, each owning one keep-alive connection (its connection
    /// limit, like HAProxy's per-server `maxconn`).
    public var connections = 16

    public init(name: String = "", url: String = "", connections: Int = 16) {
        self.name = name
        self.url = url
        self.connections = connections
    }

    static let keys: [ObjectKey<BackendConfiguration>] = [
        .string("name", \.name),
        .custom(
            "url",
            set: { (backend, json, path) throws(ConfigurationError) in
                let url = try json.configString(path)
                do {
                    _ = try Backend(url: url)
                } catch {
                    throw ConfigurationError("\(path): \(error)")
                }
                backend.url = url
            },
            get: { .string($0.url) }
        ),
        .int("connections", \.connections, range: 1...4_096),
    ]

    /// Parses one backend object (the config file and `POST /admin/backends`).
    init(json: JSONValue, path: String, extraKeys: Set<String> = []) throws(ConfigurationError) {
        self = try ObjectKey.decode(json, keys: Self.keys, into: BackendConfiguration(), path: path, required: ["url"], ignoring: extraKeys)
        if name.isEmpty { name = (try? Backend(url: url))?.name ?? url }
    }

    var json: JSONValue { ObjectKey.encode(self, keys: Self.keys) }
}

/// Active health checks of an upstream pool's backends: HAProxy's `check`
/// with `inter`, `timeout check`, `rise` and `fall`.
public struct HealthCheckConfiguration: Sendable, Equatable {
    /// The path (and query) to `GET`; a 2xx or 3xx answer is healthy.
    public var path = "/"
    public var intervalMilliseconds: Int64 = 2_000
    public var timeoutMilliseconds: Int64 = 1_000
    public var rise = 2
    public var fall = 3

    public init() {}

    static let keys: [ObjectKey<HealthCheckConfiguration>] = [
        .custom(
            "path",
            set: { (health, json, path) throws(ConfigurationError) in
                let text = try json.configString(path)
                guard text.hasPrefix("/") else { throw ConfigurationError("\(path): \"\(text)\" must start with /") }
                health.path = text
            },
            get: { .string($0.path) }
        ),
        .int64("interval_ms", \.intervalMilliseconds, range: 10...3_600_000),
        .int64("timeout_ms", \.timeoutMilliseconds, range: 1...600_000),
        .int("rise", \.rise, range: 1...100),
        .int("fall", \.fall, range: 1...100),
    ]

    /// What ``HealthChecker`` runs.
    var checker: HealthChecker.Configuration {
        HealthChecker.Configuration(
            path: path,
            interval: .milliseconds(intervalMilliseconds),
            timeout: .milliseconds(timeoutMilliseconds),
            rise: rise,
            fall: fall
        )
    }
}

/// One field of a JSON object inside the configuration (a pool, a backend, a
/// health check): its name, how to set it, how to print it.
struct ObjectKey<Value>: Sendable {
    let name: String
    /// Sets the field from `json`; the `String` names the field for messages (`pools[0].retries`).
    let set: @Sendable (inout Value, JSONValue, String) throws(ConfigurationError) -> Void
    /// The field's JSON, or `nil` when it is unset and not printed.
    let get: @Sendable (Value) -> JSONValue?

    static func custom(
        _ name: String,
        set: @escaping @Sendable (inout Value, JSONValue, String) throws(ConfigurationError) -> Void,
        get: @escaping @Sendable (Value) -> JSONValue?
    ) -> Self {
        Self(name: name, set: set, get: get)
    }

    static func string(_ name: String, _ keyPath: WritableKeyPath<Value, String> & Sendable) -> Self {
        Self(
            name: name,
            set: { (value, json, path) throws(ConfigurationError) in
                let text = try json.configString(path)
                guard !text.isEmpty else { throw ConfigurationError("\(path): must not be empty") }
                value[keyPath: keyPath] = text
            },
            get: { .string($0[keyPath: keyPath]) }
        )
    }

    /// A field whose value is one of an enumeration's raw names.
    static func choice<Choice: RawRepresentable<String> & CaseIterable & SendableMetatype>(
        _ name: String, _ keyPath: WritableKeyPath<Value, Choice> & Sendable
    ) -> Self {
        let names = Choice.allCases.map(\.rawValue).joined(separator: ", ")
        return Self(
            name: name,
            set: { (value, json, path) throws(ConfigurationError) in
                let text = try json.configString(path)
                guard let choice = Choice(rawValue: text) else {
                    throw ConfigurationError("\(path): \"\(text)\" is not one of \(names)")
                }
                value[keyPath: keyPath] = choice
            },
            get: { .string($0[keyPath: keyPath].rawValue) }
        )
    }

    static func int(_ name: String, _ keyPath: WritableKeyPath<Value, Int> & Sendable, range: ClosedRange<Int>) -> Self {
        Self(
            name: name,
            set: { (value, json, path) throws(ConfigurationError) in
                value[keyPath: keyPath] = Int(try json.configInt64(path, range: Int64(range.lowerBound)...Int64(range.upperBound)))
            },
            get: { JSONValue($0[keyPath: keyPath]) }
        )
    }

    static func int64(_ name: String, _ keyPath: WritableKeyPath<Value, Int64> & Sendable, range: ClosedRange<Int64>) -> Self {
        Self(
            name: name,
            set: { (value, json, path) throws(ConfigurationError) in
                value[keyPath: keyPath] = try json.configInt64(path, range: range)
            },
            get: { JSONValue($0[keyPath: keyPath]) }
        )
    }

    /// A time in whole milliseconds within `range`; 0 stands for none (`nil`).
    static func milliseconds(
        _ name: String,
        _ keyPath: WritableKeyPath<Value, Duration?> & Sendable,
        range: ClosedRange<Int64>
    ) -> Self {
        Self(
            name: name,
            set: { (value, json, path) throws(ConfigurationError) in
                value[keyPath: keyPath] = .milliseconds(orNone: try json.configInt64(path, range: range))
            },
            get: { JSONValue($0[keyPath: keyPath]?.milliseconds ?? 0) }
        )
    }

    /// Reads a JSON object into `initial` field by field: an unknown field,
    /// a missing required one or a bad value is an error naming it.
    static func decode(
        _ json: JSONValue,
        keys: [ObjectKey<Value>],
        into initial: Value,
        path: String,
        required: Set<String> = [],
        ignoring: Set<String> = []
    ) throws(ConfigurationError) -> Value {
        guard case .object(let object) = json else {
            throw ConfigurationError("\(path): must be an object, not \(json.typeName)")
        }
        var value = initial
        var seen: Set<String> = []
        for member in object.members where !ignoring.contains(member.key) {
            guard let key = keys.first(where: { $0.name == member.key }) else {
                throw ConfigurationError(
                    "\(path): unknown key \"\(member.key)\"; known keys: \(keys.map(\.name).joined(separator: ", "))"
                )
            }
            try key.set(&value, member.value, "\(path).\(member.key)")
            seen.insert(member.key)
        }
        for name in keys.map(\.name) where required.contains(name) && !seen.contains(name) {
            throw ConfigurationError("\(path): \"\(name)\" is missing")
        }
        return value
    }

    /// The fields that are set, as a JSON object.
    static func encode(_ value: Value, keys: [ObjectKey<Value>]) -> JSONValue {
        .object(JSONObject(keys.compactMap { key in key.get(value).map { (key: key.name, value: $0) } }))
    }
}

extension Duration {
    /// A setting in milliseconds where 0 stands for none.
    static func milliseconds(orNone milliseconds: Int64) -> Duration? {
        milliseconds > 0 ? .milliseconds(milliseconds) : nil
    }
}

extension JSONValue {
    /// The value as a string, or an error naming `path`.
    func configString(_ path: String) throws(ConfigurationError) -> String {
        guard case .string(let text) = self else { throw ConfigurationError("\(path): must be a string, not \(typeName)") }
        return text
    }

    /// The value as a whole number within `range`, or an error naming `path`.
    func configInt64(_ path: String, range: ClosedRange<Int64>) throws(ConfigurationError) -> Int64 {
        guard let value = int64 else { throw ConfigurationError("\(path): \(self) is not a whole number") }
        guard range.contains(value) else {
            throw ConfigurationError("\(path): \(value) is out of range \(range.lowerBound)...\(range.upperBound)")
        }
        return value
    }
}

import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle
import Synchronization

/// The up/down state of a backend under active checks, with HAProxy's rise and
/// fall semantics: `fall` consecutive failures take an up backend down, `rise`
/// consecutive successes bring a down backend up. A result that agrees with the
/// current state resets the opposite streak.
public struct HealthState: Sendable, Hashable {
    public let rise: Int
    public let fall: Int
    public private(set) var isUp: Bool
    /// Consecutive successes while down, or consecutive failures while up.
    public private(set) var streak = 0

    /// - Parameters:
    ///   - rise: successes in a row that mark a down backend up (at least 1).
    ///   - fall: failures in a row that mark an up backend down (at least 1).
    ///   - initiallyUp: HAProxy starts servers up; pass `false` to require `rise`
    ///     successes before the first request.
    public init(rise: Int, fall: Int, initiallyUp: Bool = true) {
        self.rise = max(rise, 1)
        self.fall = max(fall, 1)
        self.isUp = initiallyUp
    }

    /// Records one check result; returns the new state if this result changed it.
    public mutating func record(success: Bool) -> Bool? {
        if success == isUp {
            streak = 0
            return nil
        }
        streak += 1
        guard streak >= (isUp ? fall : rise) else { return nil }
        isUp.toggle()
        streak = 0
        return isUp
    }
}

/// Passive health: counts consecutive failed exchanges of one backend and says
/// when to eject it for a cool-down (like nginx `max_fails`/`fail_timeout`, or
/// Envoy's consecutive-5xx outlier detection).
///
/// A value type owned by whoever sees the results (the backend's entry in the
/// server); it needs no clock of its own, the caller passes `now`.
public struct PassiveHealth: Sendable, Hashable {
    /// Consecutive failures that eject the backend.
    public let maxFailures: Int
    /// How long an ejected backend stays out.
    public let coolDown: Duration
    public private(set) var consecutiveFailures = 0
    /// When the current ejection ends; `nil` when not ejected.
    public private(set) var ejectedUntil: ContinuousClock.Instant?

    public init(maxFailures: Int, coolDown: Duration) {
        self.maxFailures = max(maxFailures, 1)
        self.coolDown = coolDown
    }

    /// A successful exchange: the failure streak starts again.
    public mutating func recordSuccess() {
        consecutiveFailures = 0
    }

    /// A failed exchange (connect failure, timeout, invalid response: the
    /// caller decides what counts). Returns true when this failure ejects the
    /// backend, which happens once per streak; the streak starts again after it.
    public mutating func recordFailure(now: ContinuousClock.Instant = .now) -> Bool {
        if let until = ejectedUntil, now < until { return false }
        consecutiveFailures += 1
        guard consecutiveFailures >= maxFailures else { return false }
        consecutiveFailures = 0
        ejectedUntil = now + coolDown
        return true
    }

    /// Whether the backend is ejected at `now`; the ejection ends by itself after the cool-down.
    public func isEjected(now: ContinuousClock.Instant = .now) -> Bool {
        guard let until = ejectedUntil else { return false }
        return now < until
    }
}

/// Active health checks of one backend: a `GET` of a path every interval, each
/// on a new connection and with a timeout, counted with rise and fall.
///
/// A swift-service-lifecycle `Service`: ``run()`` checks until graceful shutdown
/// or cancellation. ``status`` may be read from any task at any time (for
/// `/stats`); `onTransition` is called from the checking task after each change
/// between up and down, never concurrently with itself.
public final class HealthChecker: Service, Sendable {
    /// How to check.
    public struct Configuration: Sendable, Hashable {
        /// The path (and query) to `GET`, e.g. `/healthz`.
        public var path: String
        public var interval: Duration
        /// For the whole check: connect, response head, and each body read.
        public var timeout: Duration
        public var rise: Int
        public var fall: Int
        public var initiallyUp: Bool

        public init(
            path: String = "/",
            interval: Duration = .seconds(2),
            timeout: Duration = .seconds(1),
            rise: Int = 2,
            fall: Int = 3,
            initiallyUp: Bool = true
        ) {
            self.path = path
            self.interval = interval
            self.timeout = timeout
            self.rise = rise
            self.fall = fall
            self.initiallyUp = initiallyUp
        }
    }

    /// The outcome of one check.
    public struct CheckResult: Sendable, Hashable {
        /// When the check started.
        public var startedAt: ContinuousClock.Instant
        public var latency: Duration
        /// The status received, if a response came.
        public var status: HTTPResponseStatus?
        /// Why the check failed; `nil` on success.
        public var failure: String?
        /// A 2xx or 3xx response (HAProxy's `httpchk` default).
        public var succeeded: Bool { failure == nil }
    }

    /// What the checker knows now.
    public struct Status: Sendable, Hashable {
        public var isUp: Bool
        public var checks: Int
        public var lastCheck: CheckResult?
    }

    /// A change between up and down.
    public struct Transition: Sendable, Hashable {
        public var backend: Backend
        public var isUp: Bool
        /// The check that caused it.
        public var check: CheckResult
    }

    public let backend: Backend
    public let configuration: Configuration
    private let onTransition: @Sendable (Transition) -> Void
    private let eventLoop: any EventLoop
    private let state: Mutex<(health: HealthState, status: Status)>

    public init(
        backend: Backend,
        configuration: Configuration,
        eventLoop: any EventLoop = MultiThreadedEventLoopGroup.singleton.next(),
        onTransition: @escaping @Sendable (Transition) -> Void
    ) {
        self.backend = backend
        self.configuration = configuration
        self.eventLoop = eventLoop
        self.onTransition = onTransition
        let health = HealthState(
            rise: configuration.rise,
            fall: configuration.fall,
            initiallyUp: configuration.initiallyUp
        )
        self.state = Mutex((health, Status(isUp: health.isUp, checks: 0, lastCheck: nil)))
    }

    /// The current state and the last check.
    public var status: Status { state.withLock { $0.status } }

    /// Checks every interval until graceful shutdown or cancellation.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                let started = ContinuousClock.now
                await self.checkOnce()
                try? await Task.sleep(until: started + self.configuration.interval, clock: .continuous)
            }
        }
    }

    /// Runs one check now, records it, and calls `onTransition` if it changed the state.
    @discardableResult
    public func checkOnce() async -> CheckResult {
        let result = await probe()
        let transition = state.withLock { state -> Transition? in
            state.status.checks += 1
            state.status.lastCheck = result
            guard let isUp = state.health.record(success: result.succeeded) else { return nil }
            state.status.isUp = isUp
            return Transition(backend: backend, isUp: isUp, check: result)
        }
        if let transition { onTransition(transition) }
        return result
    }

    private func probe() async -> CheckResult {
        let timeout = TimeAmount(configuration.timeout)
        let connection = UpstreamConnection(
            backend: backend,
            configuration: UpstreamConfiguration(
                connectTimeout: timeout,
                responseHeaderTimeout: timeout,
                idleTimeout: timeout
            ),
            eventLoop: eventLoop
        )
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: backend.hostHeader)
        headers.add(name: "User-Agent", value: "swift-balancer-health-check")
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: configuration.path, headers: headers)
        let sink = DiscardingResponseWriter()
        let started = ContinuousClock.now
        var result = CheckResult(startedAt: started, latency: .zero, status: nil, failure: nil)
        do {
            let forwarded = try await connection.forward(
                head,
                body: EmptyBody(),
                forwarding: ForwardedFor(clientAddress: nil),
                to: sink
            )
            result.status = forwarded.status
            if !(200..<400).contains(forwarded.status.code) {
                result.failure = "status \(forwarded.status.code)"
            }
        } catch {
            result.failure = "\(error.kind.rawValue): \(error.detail)"
        }
        result.latency = ContinuousClock.now - started
        await connection.close()
        return result
    }
}

/// A request body with no bytes.
public struct EmptyBody: AsyncSequence, Sendable {
    public typealias Element = ByteBuffer
    public struct AsyncIterator: AsyncIteratorProtocol {
        public mutating func next() async throws -> ByteBuffer? { nil }
    }
    public init() {}
    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator() }
}

/// A response writer that drops the response: for health checks.
struct DiscardingResponseWriter: ProxyResponseWriter {
    func writeHead(_ head: HTTPResponseHead) async throws {}
    func writeBody(_ buffer: ByteBuffer) async throws {}
    func end(trailers: HTTPHeaders?) async throws {}
}

import Synchronization

/// What the routes need to know about the server itself: when it started,
/// whether it is draining (then `/readyz` answers 503), and its connections' counts.
public final class ServerState: Sendable {
    private let draining = Atomic<Bool>(false)
    private let startedAt = ContinuousClock.now
    /// Counted by every connection's ``ConnectionGuard``.
    public let connections = ConnectionStats()

    public init() {}

    /// True once graceful shutdown has begun.
    public var isDraining: Bool { draining.load(ordering: .relaxed) }

    /// Marks the server draining; true only for the call that changed it.
    func beginDraining() -> Bool { !draining.exchange(true, ordering: .relaxed) }

    /// Time since the server was created.
    public var uptime: Duration { ContinuousClock.now - startedAt }
}

/// What happened to the server's connections, for `/stats`.
public final class ConnectionStats: Sendable {
    private let sendTimeouts = Atomic<Int>(0)

    /// Connections closed because the client took none of its response for `send_timeout_ms`.
    public var sendTimeoutCount: Int { sendTimeouts.load(ordering: .relaxed) }

    func countSendTimeout() { sendTimeouts.wrappingAdd(1, ordering: .relaxed) }
}

/// Open connections, for `max_connections`.
final class ConnectionCounter: Sendable {
    private let count = Atomic<Int>(0)

    /// Counts one more; returns the new total.
    func open() -> Int { count.wrappingAdd(1, ordering: .relaxed).newValue }
    func close() { count.wrappingSubtract(1, ordering: .relaxed) }
}

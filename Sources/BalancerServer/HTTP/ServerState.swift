import Synchronization

/// What the routes need to know about the server itself: when it started and
/// whether it is draining (then `/readyz` answers 503).
public final class ServerState: Sendable {
    private let draining = Atomic<Bool>(false)
    private let startedAt = ContinuousClock.now

    public init() {}

    /// True once graceful shutdown has begun.
    public var isDraining: Bool { draining.load(ordering: .relaxed) }

    /// Marks the server draining; true only for the call that changed it.
    func beginDraining() -> Bool { !draining.exchange(true, ordering: .relaxed) }

    /// Time since the server was created.
    public var uptime: Duration { ContinuousClock.now - startedAt }
}

/// Open connections, for `max_connections`.
final class ConnectionCounter: Sendable {
    private let count = Atomic<Int>(0)

    /// Counts one more; returns the new total.
    func open() -> Int { count.wrappingAdd(1, ordering: .relaxed).newValue }
    func close() { count.wrappingSubtract(1, ordering: .relaxed) }
}

import Synchronization
import Testing

@testable import BalancerCore

/// A latch an operation waits on until the test opens it.
final class Gate: Sendable {
    private let state = Locked<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func wait() async {
        await withCheckedContinuation { continuation in
            let resumeNow = state.withLock { state in
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLock { state in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}

/// A value shared by tasks under a lock.
final class Shared<Value: Sendable>: Sendable {
    private let mutex: Locked<Value>

    init(_ value: Value) { mutex = Locked(value) }

    func withLock<Result: Sendable>(_ body: (inout Value) -> Result) -> Result {
        mutex.withLock { body(&$0) }
    }
}

/// A thread-safe counter and log for what operations did.
final class Recorder: Sendable {
    private let events = Locked<[String]>([])

    func record(_ event: String) { events.withLock { $0.append(event) } }
    var all: [String] { events.withLock { $0 } }
    func count(_ event: String) -> Int { events.withLock { $0.filter { $0 == event }.count } }
}

/// Polls `condition` on the balancer's stats until it holds, or fails the test after `timeout`.
@discardableResult
func eventually(
    _ balancer: Balancer,
    timeout: Duration = .seconds(30),
    sourceLocation: SourceLocation = #_sourceLocation,
    _ condition: (BalancerStats) -> Bool
) async -> BalancerStats {
    let deadline = ContinuousClock.now + timeout
    while true {
        let stats = await balancer.stats()
        if condition(stats) { return stats }
        if ContinuousClock.now > deadline {
            Issue.record("condition not met within \(timeout); last stats: \(stats)", sourceLocation: sourceLocation)
            return stats
        }
        try? await Task.sleep(for: .milliseconds(1))
    }
}

/// Runs `body` with `balancer` running; shuts it down and waits for `run()` after.
func withRunning<T: Sendable>(
    _ balancer: Balancer,
    _ body: @Sendable (Balancer) async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask {
            await balancer.run()
            return nil
        }
        do {
            let result = try await body(balancer)
            balancer.shutdown(gracePeriod: .seconds(30))
            try await group.waitForAll()
            return result
        } catch {
            group.cancelAll()
            throw error
        }
    }
}

/// The accounting every snapshot must satisfy.
func checkAccounting(_ stats: BalancerStats, sourceLocation: SourceLocation = #_sourceLocation) {
    let ended =
        stats.completed + stats.failed + stats.cancelled + stats.overloaded + stats.queueTimeouts + stats.shutDown
        + stats.unavailable + stats.busy + stats.replicasOutOfRange
    #expect(stats.submitted == ended + stats.inFlight, "\(stats)", sourceLocation: sourceLocation)
    #expect(stats.workers.allSatisfy { $0.pending >= 0 && $0.pending <= stats.capacity }, sourceLocation: sourceLocation)
}

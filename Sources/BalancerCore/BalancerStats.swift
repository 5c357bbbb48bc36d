/// A snapshot of a ``Balancer``: every figure the talk's program printed, and
/// the counts an operator needs. `/stats`, `/metrics` and `balancer stats` all
/// render this one value.
///
/// Totals count how each request ended, as its requester saw it:
/// `submitted == completed + failed + cancelled + overloaded + queueTimeouts +
/// shutDown + unavailable + busy + replicasOutOfRange + inFlight` at any snapshot. A
/// replicated request counts once there, however many copies it ran.
public struct BalancerStats: Sendable, Equatable {
    /// A worker's state.
    public enum WorkerState: String, Sendable {
        /// In the heap: takes new requests.
        case active
        /// Takes no new requests; leaves the pool when its pending reaches zero.
        case draining
        /// Removed: its queued requests went back to the balancer; it leaves the
        /// pool when its running request ends.
        case removing
        /// Marked down (a failed health check): out of the heap, its queued
        /// requests went back to the balancer; it returns when marked up.
        case down
    }

    /// One worker's figures.
    public struct Worker: Sendable, Equatable {
        public var id: Int
        public var state: WorkerState
        /// Requests queued on this worker or running on it.
        public var pending: Int
        /// Load held against this worker (``Balancer/holdLoad(on:until:)``):
        /// every choice counts it as pending, but it is not in `pending`.
        public var held: Int = 0
        /// The highest `pending` this worker has had.
        public var pendingMax: Int
        /// Requests whose operation returned a value on this worker (of a
        /// replicated request, the copy that answered).
        public var completed: Int
        /// Requests whose operation threw on this worker (of a replicated
        /// request, the copy whose error answered, after every copy failed).
        public var failed: Int
        /// The peak-EWMA latency estimate, for ``Strategy/peakEWMA``; `nil`
        /// before the first sample or under other strategies.
        public var latencyEstimate: Duration? = nil
    }

    public var strategy: Strategy
    /// C, as used by the strategy.
    public var capacity: Int
    public var workers: [Worker]
    /// Requests waiting in the backlog now.
    public var backlogDepth: Int
    /// Restricted requests waiting beside the backlog for room on an eligible
    /// worker now (``Balancer/submitOnWorker(ifRoomAmong:waitingAtMost:_:)``).
    public var waiting: Int = 0
    /// Q.
    public var backlogLimit: Int
    /// T.
    public var queueTimeout: Duration

    /// Every request that reached the balancer, refused ones included.
    public var submitted: Int
    /// Ended with the operation's value.
    public var completed: Int
    /// Ended with the operation's error.
    public var failed: Int
    /// Ended with ``BalancerError/cancelled``.
    public var cancelled: Int
    /// Ended with ``BalancerError/overloaded``.
    public var overloaded: Int
    /// Ended with ``BalancerError/queueTimeout``.
    public var queueTimeouts: Int
    /// Ended with ``BalancerError/shuttingDown``.
    public var shutDown: Int
    /// Ended with ``BalancerError/unavailable``.
    public var unavailable: Int = 0
    /// Ended with ``BalancerError/busy``.
    public var busy: Int = 0
    /// Ended with ``BalancerError/replicasOutOfRange(requested:activeWorkers:)``.
    public var replicasOutOfRange: Int = 0
    /// Admitted and not yet answered: in the backlog, waiting for room on
    /// eligible workers, or pending on a worker.
    public var inFlight: Int

    /// Replicated requests (asking for 2 or more copies) admitted.
    public var replicated: Int = 0
    /// Replicated requests answered by a copy's value: the winner's.
    public var replicaWins: Int = 0
    /// Copies of replicated requests taken back from a queue without running,
    /// or cancelled while running, because the request was already answered
    /// (by another copy, or the requester's cancellation) or another copy was
    /// enough (its worker left).
    public var cancelledCopies: Int = 0

    /// Whether the balancer has begun shutting down.
    public var shuttingDown: Bool

    /// Mean of `pending` across the workers.
    public var pendingMean: Double {
        workers.isEmpty ? 0 : Double(workers.reduce(0) { $0 + $1.pending }) / Double(workers.count)
    }

    /// Population variance of `pending` across the workers, as the talk printed.
    public var pendingVariance: Double {
        guard !workers.isEmpty else { return 0 }
        let mean = pendingMean
        return workers.reduce(0.0) { sum, worker in
            let d = Double(worker.pending) - mean
            return sum + d * d
        } / Double(workers.count)
    }
}

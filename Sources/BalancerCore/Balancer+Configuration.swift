/// How a ``Balancer`` chooses the worker for a request. Every strategy goes
/// through the same `dispatch` and `completed`; only the choice differs.
public enum Strategy: String, Sendable, CaseIterable, Codable {
    /// The talk's balancer: the least-pending worker, from the top of the heap
    /// (counting load held against a worker as pending: ``Balancer/holdLoad(on:until:)``;
    /// so do the others).
    case leastLoaded = "least-loaded"
    /// The original program's `if false` comparison branch: each worker in turn
    /// (skipping those at capacity).
    case roundRobin = "round-robin"
    /// The less pending of two workers picked at random (Mitzenmacher; Envoy's
    /// LEAST_REQUEST).
    case powerOfTwoChoices = "power-of-two"
    /// The talk's first, simpler balancer: idle workers take the next request
    /// from one shared queue. It is least-loaded with a capacity of 1, so every
    /// request beyond one per worker waits in the backlog.
    case sharedQueue = "shared-queue"
    /// Latency-aware: the worker with the least `load + 1` (pending, plus held) times a
    /// peak-sensitive moving average of its latency (Finagle's and Linkerd's
    /// PeakEWMA), so a slowing worker gets less work before its queue shows it.
    /// An exact minimum over the active workers rather than two random choices:
    /// pools here are small.
    case peakEWMA = "peak-ewma"
}

extension Balancer {
    /// A balancer's sizes and policy.
    public struct Configuration: Sendable, Equatable {
        /// Workers started by ``Balancer/run()``.
        public var workers: Int
        /// C: the most requests queued on or running on one worker (its channel's bound).
        /// ``Strategy/sharedQueue`` always uses 1.
        public var capacity: Int
        /// Q: the most requests waiting for a worker with room; beyond it a
        /// request ends at once with ``BalancerError/overloaded``.
        public var backlog: Int
        /// T: the longest a request waits in the backlog before it ends with
        /// ``BalancerError/queueTimeout``.
        public var queueTimeout: Duration
        /// How the worker is chosen.
        public var strategy: Strategy
        /// Seed for ``Strategy/powerOfTwoChoices``, for repeatable experiments.
        public var seed: UInt64
        /// How fast ``Strategy/peakEWMA`` forgets a latency peak (its time
        /// constant: a sample's weight falls by e every this long).
        public var latencyDecay: Duration

        /// - Parameters: see the properties; the defaults are those of `balancer serve`.
        public init(
            workers: Int = 8,
            capacity: Int = 16,
            backlog: Int = 1024,
            queueTimeout: Duration = .seconds(5),
            strategy: Strategy = .leastLoaded,
            seed: UInt64 = 0x5EED,
            latencyDecay: Duration = .seconds(10)
        ) {
            self.workers = workers
            self.capacity = capacity
            self.backlog = backlog
            self.queueTimeout = queueTimeout
            self.strategy = strategy
            self.seed = seed
            self.latencyDecay = latencyDecay
        }

        /// The capacity the strategy actually uses.
        public var effectiveCapacity: Int { strategy == .sharedQueue ? 1 : capacity }

        /// Problems with the values, each naming its field; empty when valid.
        public var problems: [String] {
            var problems: [String] = []
            if workers < 0 { problems.append("workers must be 0 or more (got \(workers))") }
            if capacity < 1 { problems.append("capacity must be 1 or more (got \(capacity))") }
            if backlog < 0 { problems.append("backlog must be 0 or more (got \(backlog))") }
            if queueTimeout <= .zero { problems.append("queueTimeout must be above zero (got \(queueTimeout))") }
            if latencyDecay <= .zero { problems.append("latencyDecay must be above zero (got \(latencyDecay))") }
            return problems
        }
    }
}

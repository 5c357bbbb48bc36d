import Synchronization

/// The talk's requesters in a closed loop with trivial work: what
/// `balancer bench --in-process` measures, the cost of the balancer itself.
public enum InProcessBench {
    /// What one run measured.
    public struct Result: Sendable {
        /// Requests answered with their value.
        public var requests: Int
        /// Requests answered with an error.
        public var errors: Int
        public var elapsed: Duration

        public var requestsPerSecond: Double {
            elapsed > .zero ? Double(requests) / elapsed.seconds : 0
        }
    }

    /// Runs `balancer` with `requesters` tasks, each submitting a trivial
    /// operation and awaiting its answer, over and over, for `duration`; then
    /// shuts the balancer down and returns the counts.
    public static func run(balancer: Balancer, requesters: Int, duration: Duration) async throws -> Result {
        let stop = StopFlag()
        let clock = ContinuousClock()
        let start = clock.now
        let (requests, errors) = await withTaskGroup(of: (Int, Int).self) { group in
            group.addTask { await balancer.run(); return (0, 0) }
            for requester in 0..<requesters {
                group.addTask {
                    var done = 0
                    var failed = 0
                    while !stop.isSet {
                        do {
                            let x = try await balancer.submit { requester &* 7 }
                            if x == requester &* 7 { done += 1 } else { failed += 1 }
                        } catch {
                            failed += 1
                        }
                    }
                    return (done, failed)
                }
            }
            try? await Task.sleep(for: duration)
            stop.set()
            var requests = 0
            var errors = 0
            var finishedRequesters = 0
            while let (done, failed) = await group.next() {
                requests += done
                errors += failed
                finishedRequesters += 1
                if finishedRequesters == requesters {
                    balancer.shutdown()
                }
            }
            return (requests, errors)
        }
        return Result(requests: requests, errors: errors, elapsed: clock.now - start)
    }
}

/// A flag set once by one task and read by many.
private final class StopFlag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .relaxed) }
    func set() { value.store(true, ordering: .relaxed) }
}

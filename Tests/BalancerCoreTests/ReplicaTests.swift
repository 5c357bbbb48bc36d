import Synchronization
import Testing

@testable import BalancerCore

/// An operation's error that names the worker it ran on.
private struct CopyFailure: Error, Equatable {
    let worker: Int
}

/// An operation for copies: records that it started on its worker, then waits
/// on that worker's gate (or forever, seeing cancellation) unless it is `winner`.
private func copyOperation(
    winner: Int?,
    _ recorder: Recorder
) -> @Sendable (Int) async throws -> Int {
    { worker in
        recorder.record("started \(worker)")
        if worker == winner { return worker * 10 }
        do {
            try await Task.sleep(for: .seconds(60))
        } catch is CancellationError {
            recorder.record("cancelled \(worker)")
            throw CancellationError()
        }
        return worker * 10
    }
}

/// Polls until `condition` holds; fails the test after 30 s.
private func waitUntil(_ what: String, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(30)
    while !condition() {
        if ContinuousClock.now > deadline {
            Issue.record("timed out waiting until \(what)")
            return
        }
        try await Task.sleep(for: .milliseconds(1))
    }
}

@Suite("replicated requests: first answer wins")
struct ReplicaTests {
    @Test("three copies on three workers: the first value wins, the running losers see cancellation, counts exact")
    func winnerCancelsRunningLosers() async throws {
        let balancer = Balancer(configuration: .init(workers: 3, capacity: 4))
        let seen = Recorder()
        try await withRunning(balancer) { balancer in
            // Worker 2 answers at once; 0 and 1 run until cancelled.
            let receipt = try await balancer.submitReplicated(replicas: 3, copyOperation(winner: 2, seen))
            #expect(receipt.value == 20)
            #expect(receipt.worker == 2)
            #expect(receipt.copies == 3)
            let stats = await eventually(balancer) { $0.workers.allSatisfy { $0.pending == 0 } }
            #expect(Set(seen.all) == ["started 0", "started 1", "started 2", "cancelled 0", "cancelled 1"])
            #expect(stats.submitted == 1)
            #expect(stats.completed == 1)
            #expect(stats.replicated == 1)
            #expect(stats.replicaWins == 1)
            #expect(stats.cancelledCopies == 2)
            #expect(stats.cancelled == 0, "the requester was answered, not cancelled")
            #expect(stats.inFlight == 0)
            #expect(stats.workers.map(\.completed) == [0, 0, 1])
            #expect(stats.workers.map(\.pendingMax) == [1, 1, 1], "one copy per worker")
            checkAccounting(stats)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("a losing copy queued behind other work is taken back without running")
    func queuedLoserNeverRuns() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 4))
        let held = HeldOperations()
        let seen = Recorder()
        try await withRunning(balancer) { balancer in
            // Worker 0 runs a held request; a copy sent there waits behind it.
            let first = Task { try await balancer.submitWithReceipt(held.operation()) }
            while held.runningCount == 0 { try await Task.sleep(for: .milliseconds(1)) }

            let receipt = try await balancer.submitReplicated(replicas: 2, copyOperation(winner: 1, seen))
            #expect(receipt.worker == 1)
            #expect(receipt.copies == 2)
            let during = await eventually(balancer) { $0.inFlight == 1 && $0.workers.map(\.pending) == [1, 0] }
            #expect(during.cancelledCopies == 1)
            #expect(during.workers.map(\.pendingMax) == [2, 1], "the copy was queued on worker 0")
            checkAccounting(during)

            held.releaseAll()
            #expect(try await first.value.worker == 0)
            let stats = await eventually(balancer) { $0.inFlight == 0 }
            #expect(stats.completed == 2)
            #expect(stats.replicaWins == 1)
            #expect(stats.workers.allSatisfy { $0.pending == 0 })
            checkAccounting(stats)
        }
        #expect(seen.all == ["started 1"], "the queued copy never ran")
    }

    @Test("every copy fails: the requester gets the last operation error, counted once as failed")
    func allCopiesFail() async throws {
        let balancer = Balancer(configuration: .init(workers: 3, capacity: 4))
        let gates = [Gate(), Gate(), Gate()]
        try await withRunning(balancer) { balancer in
            let request = Task {
                try await balancer.submitReplicated(replicas: 3) { worker -> Int in
                    await gates[worker].wait()
                    throw CopyFailure(worker: worker)
                }
            }
            await eventually(balancer) { $0.workers.map(\.pending) == [1, 1, 1] }
            // Fail them in the order 0, 2, 1; each failure is seen before the next.
            for worker in [0, 2] {
                gates[worker].open()
                await eventually(balancer) { $0.workers[worker].pending == 0 }
                #expect((await balancer.stats()).inFlight == 1, "still open after copy \(worker) failed")
            }
            gates[1].open()
            await #expect(throws: CopyFailure(worker: 1)) { try await request.value }
            let stats = await eventually(balancer) { $0.inFlight == 0 && $0.failed == 1 }
            #expect(stats.submitted == 1)
            #expect(stats.completed == 0)
            #expect(stats.replicaWins == 0)
            #expect(stats.cancelledCopies == 0)
            #expect(stats.workers.allSatisfy { $0.pending == 0 })
            checkAccounting(stats)
        }
    }

    @Test("replicas outside 1...active workers is refused at once with a typed error, and nothing runs")
    func replicasOutOfRange() async throws {
        let balancer = Balancer(configuration: .init(workers: 3, capacity: 4))
        let seen = Recorder()
        try await withRunning(balancer) { balancer in
            for replicas in [0, -1, 4] {
                await #expect(throws: BalancerError.replicasOutOfRange(requested: replicas, activeWorkers: 3)) {
                    try await balancer.submitReplicated(replicas: replicas) { _ in seen.record("ran") }
                }
            }
            #expect(await balancer.markDown(0))
            await #expect(throws: BalancerError.replicasOutOfRange(requested: 3, activeWorkers: 2)) {
                try await balancer.submitReplicated(replicas: 3) { _ in seen.record("ran") }
            }
            // One copy is a plain request by another road; the range is the active workers.
            let receipt = try await balancer.submitReplicated(replicas: 2) { worker in worker }
            #expect(receipt.copies == 2)
            #expect([1, 2].contains(receipt.worker))
            let stats = await eventually(balancer) { $0.inFlight == 0 && $0.workers.allSatisfy { $0.pending == 0 } }
            #expect(stats.replicasOutOfRange == 4)
            #expect(stats.submitted == 5)
            #expect(stats.completed == 1)
            #expect(stats.replicated == 1, "refused requests are not counted as replicated")
            checkAccounting(stats)
        }
        #expect(seen.all.isEmpty)
    }

    @Test("the requester cancelled: running copies see cancellation, a queued copy never runs, counts exact")
    func requesterCancelled() async throws {
        let balancer = Balancer(configuration: .init(workers: 3, capacity: 2))
        let held = HeldOperations()
        let seen = Recorder()
        try await withRunning(balancer) { balancer in
            let first = Task { try await balancer.submitWithReceipt(held.operation()) }
            while held.runningCount == 0 { try await Task.sleep(for: .milliseconds(1)) }
            // Copies go to 1 and 2 (idle), then 0, behind the held request.
            let request = Task { try await balancer.submitReplicated(replicas: 3, copyOperation(winner: nil, seen)) }
            try await waitUntil("copies run on workers 1 and 2") { seen.count("started 1") == 1 && seen.count("started 2") == 1 }
            let during = await balancer.stats()
            #expect(during.workers.map(\.pending) == [2, 1, 1])
            #expect(during.inFlight == 2)
            checkAccounting(during)

            request.cancel()
            await #expect(throws: BalancerError.cancelled) { try await request.value }
            let after = await eventually(balancer) { $0.workers.map(\.pending) == [1, 0, 0] }
            #expect(Set(seen.all) == ["started 1", "started 2", "cancelled 1", "cancelled 2"])
            #expect(after.cancelled == 1)
            #expect(after.cancelledCopies == 3)
            #expect(after.replicaWins == 0)
            #expect(after.inFlight == 1)
            checkAccounting(after)

            held.releaseAll()
            #expect(try await first.value.worker == 0)
            let stats = await eventually(balancer) { $0.inFlight == 0 }
            #expect(stats.completed == 1)
            #expect(stats.workers.allSatisfy { $0.pending == 0 })
            checkAccounting(stats)
        }
    }

    @Test("copies go only to workers with room: fewer copies when few are free; none free means one backlog entry")
    func copiesOnlyWhereThereIsRoom() async throws {
        let balancer = Balancer(configuration: .init(workers: 3, capacity: 1, backlog: 4))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<2 {
                    group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                    await eventually(balancer) { $0.inFlight == i + 1 }
                }
                // One worker has room: the request runs as one copy.
                let one = try await balancer.submitReplicated(replicas: 3) { worker in worker }
                #expect(one.copies == 1)
                #expect(one.worker == 2)

                group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                await eventually(balancer) { $0.inFlight == 3 }
                // None has room: it waits in the backlog as one entry, and is
                // copied to the workers free when it leaves.
                let waiting = Task { try await balancer.submitReplicated(replicas: 3) { worker in worker } }
                let queued = await eventually(balancer) { $0.inFlight == 4 }
                #expect(queued.backlogDepth == 1)
                checkAccounting(queued)
                while held.runningCount < 3 { try await Task.sleep(for: .milliseconds(1)) }
                #expect(held.releaseOne { _ in 0 })
                let receipt = try await waiting.value
                #expect(receipt.copies == 1, "one worker was free when it left the backlog")

                held.releaseAll()
                for try await _ in group {}
            }
            let stats = await eventually(balancer) { $0.inFlight == 0 }
            #expect(stats.replicated == 2)
            #expect(stats.replicaWins == 2)
            #expect(stats.cancelledCopies == 0)
            #expect(stats.completed == 5)
            #expect(stats.workers.allSatisfy { $0.pending == 0 && $0.pendingMax == 1 })
            checkAccounting(stats)
        }
    }

    @Test("a copy queued on a worker marked down is dropped while another copy is open")
    func redundantCopyDroppedWhenItsWorkerGoesDown() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 2, backlog: 4))
        let held = HeldOperations()
        let seen = Recorder()
        try await withRunning(balancer) { balancer in
            let first = Task { try await balancer.submitWithReceipt(held.operation()) }
            while held.runningCount == 0 { try await Task.sleep(for: .milliseconds(1)) }
            let request = Task { try await balancer.submitReplicated(replicas: 2, copyOperation(winner: nil, seen)) }
            try await waitUntil("the copy runs on worker 1") { seen.count("started 1") == 1 }
            #expect((await balancer.stats()).workers.map(\.pending) == [2, 1])

            #expect(await balancer.markDown(0))
            let after = await eventually(balancer) { $0.workers.map(\.pending) == [1, 1] }
            #expect(after.backlogDepth == 0, "the copy is not requeued")
            #expect(after.cancelledCopies == 1)
            #expect(after.inFlight == 2)
            checkAccounting(after)

            request.cancel()
            await #expect(throws: BalancerError.cancelled) { try await request.value }
            held.releaseAll()
            _ = try await first.value
            let stats = await eventually(balancer) { $0.inFlight == 0 && $0.workers.allSatisfy { $0.pending == 0 } }
            #expect(stats.cancelledCopies == 2)
            checkAccounting(stats)
        }
        #expect(seen.count("started 0") == 0)
    }

    @Test("past the grace period a replicated request ends with shuttingDown and its copies are cancelled")
    func shutdownCancelsCopies() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 2))
        let seen = Recorder()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await balancer.run() }
            let request = Task { try await balancer.submitReplicated(replicas: 2, copyOperation(winner: nil, seen)) }
            try await waitUntil("both copies run") { seen.count("started 0") == 1 && seen.count("started 1") == 1 }
            balancer.shutdown(gracePeriod: .milliseconds(50))
            await #expect(throws: BalancerError.shuttingDown) { try await request.value }
            try await group.waitForAll()
        }
        let stats = await balancer.stats()
        // The forced stop does not wait for the copies to see their cancellation.
        try await waitUntil("both copies see cancellation") { seen.count("cancelled 0") == 1 && seen.count("cancelled 1") == 1 }
        #expect(Set(seen.all) == ["started 0", "started 1", "cancelled 0", "cancelled 1"])
        #expect(stats.shutDown == 1)
        #expect(stats.submitted == 1)
        // A forced stop does not wait for the cancelled copies' reports: in
        // flight is exact, the workers' pending is their last count.
        #expect(stats.inFlight == 0)
        checkAccounting(stats)
    }

    @Test("stress: replicated and plain requests mixed, some cancelled; every answer its own, counts exact throughout")
    func stress() async throws {
        let requesters = 16
        let perRequester = 1_500
        let balancer = Balancer(configuration: .init(workers: 6, capacity: 3, backlog: 256, queueTimeout: .seconds(60)))
        let stop = Shared(false)
        try await withRunning(balancer) { balancer in
            async let watcher: Int = {
                var snapshots = 0
                while !stop.withLock({ $0 }) {
                    checkAccounting(await balancer.stats())
                    snapshots += 1
                    try? await Task.sleep(for: .milliseconds(2))
                }
                return snapshots
            }()
            let (right, cancelled) = try await withThrowingTaskGroup(of: (Int, Int).self) { group in
                for requester in 0..<requesters {
                    group.addTask {
                        var rng = SplitMix64(seed: UInt64(requester) &+ 99)
                        var right = 0
                        var cancelled = 0
                        for i in 0..<perRequester {
                            let expected = requester * perRequester + i
                            let pause = Int.random(in: 0..<16, using: &rng)
                            let replicas = Int.random(in: 0..<4, using: &rng)
                            let cancel = Int.random(in: 0..<20, using: &rng) == 0
                            let work = Task { () async throws -> Int in
                                let operation: @Sendable (Int) async throws -> Int = { _ in
                                    if pause == 0 {
                                        try await Task.sleep(for: .microseconds(50))
                                    } else if pause < 6 {
                                        await Task.yield()
                                    }
                                    return expected
                                }
                                if replicas == 0 {
                                    return try await balancer.submit { try await operation(0) }
                                }
                                return try await balancer.submitReplicated(replicas: replicas, operation).value
                            }
                            if cancel {
                                await Task.yield()
                                work.cancel()
                            }
                            do {
                                if try await work.value == expected { right += 1 }
                            } catch BalancerError.cancelled where cancel {
                                cancelled += 1
                            }
                        }
                        return (right, cancelled)
                    }
                }
                return try await group.reduce((0, 0)) { ($0.0 + $1.0, $0.1 + $1.1) }
            }
            stop.withLock { $0 = true }
            #expect(await watcher > 0)
            #expect(right + cancelled == requesters * perRequester, "every request got its own answer or was cancelled")
            let stats = await eventually(balancer) { $0.inFlight == 0 && $0.workers.allSatisfy { $0.pending == 0 } }
            #expect(stats.submitted == requesters * perRequester)
            #expect(stats.completed == right)
            #expect(stats.cancelled == cancelled)
            #expect(stats.overloaded == 0 && stats.queueTimeouts == 0 && stats.failed == 0)
            #expect(stats.replicaWins <= stats.replicated)
            #expect(stats.workers.allSatisfy { $0.pendingMax <= 3 })
            checkAccounting(stats)
            #expect(await balancer.poolIsValid())
        }
    }
}

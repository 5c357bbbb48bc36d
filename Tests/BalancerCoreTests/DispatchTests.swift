import Synchronization
import Testing

@testable import BalancerCore

/// Submits `count` requests one at a time, each answered at once and waited
/// for until `balancer` counts it completed (it had `completedBefore`), and
/// returns the workers that ran them.
func workersOneAtATime(_ balancer: Balancer, _ count: Int, completedBefore: Int = 0) async throws -> [Int] {
    var ran: [Int] = []
    for n in 1...count {
        ran.append(try await balancer.submitWithReceipt { 0 }.worker)
        _ = await eventually(balancer) { $0.completed == completedBefore + n }
    }
    return ran
}

/// Operations that hold their worker until the test releases them, one by one.
final class HeldOperations: Sendable {
    private let running = Locked<[Gate]>([])

    /// An operation that registers its gate when it starts and ends when the test opens it.
    func operation() -> @Sendable () async throws -> Int {
        { [self] in
            let gate = Gate()
            running.withLock { $0.append(gate) }
            await gate.wait()
            return 1
        }
    }

    var runningCount: Int { running.withLock { $0.count } }

    /// Releases one running operation chosen by `pick`.
    func releaseOne(_ pick: (Int) -> Int) -> Bool {
        let gate: Gate? = running.withLock { gates in
            guard !gates.isEmpty else { return nil }
            return gates.remove(at: pick(gates.count))
        }
        gate?.open()
        return gate != nil
    }

    func releaseAll() {
        while releaseOne({ _ in 0 }) {}
    }

    /// Releases running operations one at a time until `balancer` has nothing
    /// in flight: a release lets the next queued request start, and it is
    /// held in turn.
    func releaseUntilIdle(_ balancer: Balancer) async throws {
        while await balancer.stats().inFlight > 0 {
            _ = releaseOne { _ in 0 }
            try await Task.sleep(for: .milliseconds(1))
        }
    }
}

@Suite("dispatch and completed")
struct DispatchTests {
    @Test("dispatch always picks a worker with the least pending (ties: least recently dispatched); completed decrements exactly once")
    func dispatchPicksTheLeastLoaded() async throws {
        let balancer = Balancer(configuration: .init(workers: 5, capacity: 6, backlog: 0))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { requesters in
                var rng = SplitMix64(seed: 42)
                var before = await balancer.stats()
                var inFlight = 0
                var lastDispatch: [Int: Int] = [:]
                for step in 0..<300 {
                    let full = inFlight == 5 * 6
                    if !full && (inFlight == 0 || Int.random(in: 0..<3, using: &rng) > 0) {
                        requesters.addTask { _ = try await balancer.submit(held.operation()) }
                        inFlight += 1
                        let after = await eventually(balancer) { $0.inFlight == inFlight }
                        let changed = zip(before.workers, after.workers).filter { $0.pending != $1.pending }
                        #expect(changed.count == 1, "step \(step): one worker takes the request")
                        if let (old, new) = changed.first {
                            #expect(new.pending == old.pending + 1)
                            let least = before.workers.map(\.pending).min()!
                            #expect(old.pending == least, "step \(step): dispatch chose pending \(old.pending), least was \(least)")
                            let tied = before.workers.filter { $0.pending == least }.map(\.id)
                            let expected = tied.min { (lastDispatch[$0, default: 0], $0) < (lastDispatch[$1, default: 0], $1) }
                            #expect(old.id == expected, "ties go to the least recently dispatched, then the lowest id")
                            lastDispatch[old.id] = step + 1
                        }
                        before = after
                    } else {
                        // Wait until every dispatched request has started or is queued, then finish one.
                        let released = held.releaseOne { Int.random(in: 0..<$0, using: &rng) }
                        if !released {
                            // Nothing running yet: the started ones are still on their way.
                            try await Task.sleep(for: .milliseconds(1))
                            continue
                        }
                        inFlight -= 1
                        let after = await eventually(balancer) { $0.inFlight == inFlight && $0.completed == before.completed + 1 }
                        let changed = zip(before.workers, after.workers).filter { $0.pending != $1.pending }
                        #expect(changed.count == 1, "step \(step): completed touches one worker")
                        if let (old, new) = changed.first {
                            #expect(new.pending == old.pending - 1)
                            #expect(new.completed == old.completed + 1)
                        }
                        before = after
                    }
                    #expect(before.workers.allSatisfy { $0.pending >= 0 })
                    #expect(await balancer.poolIsValid())
                    checkAccounting(before)
                }
                while inFlight > 0 {
                    if held.releaseOne({ _ in 0 }) { inFlight -= 1 } else { try await Task.sleep(for: .milliseconds(1)) }
                }
                try await requesters.waitForAll()
            }
            let end = await eventually(balancer) { $0.inFlight == 0 }
            #expect(end.workers.allSatisfy { $0.pending == 0 })
            #expect(end.completed == end.submitted)
        }
    }

    @Test("idle workers of the group with the fewest pending go first (one backend's connections)")
    func groupsBreakTiesByTheirPending() async throws {
        // Two backends with two one-request connections each: workers 0, 1 and 2, 3.
        let balancer = Balancer(configuration: .init(workers: 4, capacity: 1, backlog: 8), groups: [0, 0, 1, 1])
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { requesters in
                requesters.addTask { _ = try await balancer.submit(held.operation()) }
                _ = await eventually(balancer) { $0.inFlight == 1 }
                #expect(await balancer.stats().workers[0].pending == 1)
                // Worker 1 is idle, but its backend has a request in flight: the others' backend takes them all.
                let ran = try await workersOneAtATime(balancer, 4)
                #expect(ran == [2, 3, 2, 3])
                held.releaseAll()
                try await requesters.waitForAll()
            }
            let end = await eventually(balancer) { $0.inFlight == 0 && $0.completed == 5 }
            #expect(end.workers.allSatisfy { $0.pending == 0 })
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("load held against a worker passes it over until the deadline, and goes when it leaves")
    func heldLoadPassesAWorkerOver() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 4, backlog: 8))
        try await withRunning(balancer) { balancer in
            balancer.holdLoad(on: 0, until: .now + .seconds(60))
            let ran = try await workersOneAtATime(balancer, 3)
            #expect(ran == [1, 1, 1], "worker 0 counts as one request busier")
            let stats = await balancer.stats()
            #expect(stats.workers.allSatisfy { $0.pending == 0 }, "no worker's pending changed")
            #expect(stats.workers.map(\.held) == [1, 0])
            #expect(await balancer.removeWorker(0))
            #expect(try await balancer.submitWithReceipt { 0 }.worker == 1)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test(
        "every strategy counts held load as room taken, and a worker keeps its hold through down and up",
        arguments: [Strategy.leastLoaded, .roundRobin, .powerOfTwoChoices, .sharedQueue, .peakEWMA])
    func everyStrategyCountsHeldLoad(strategy: Strategy) async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 1, backlog: 8, strategy: strategy))
        try await withRunning(balancer) { balancer in
            balancer.holdLoad(on: 0, until: .now + .seconds(60))
            let before = try await workersOneAtATime(balancer, 2)
            #expect(before == [1, 1], "worker 0's one request of room is held")
            // Down and up again: still held.
            #expect(await balancer.markDown(0))
            #expect(await balancer.markUp(0))
            let after = try await workersOneAtATime(balancer, 2, completedBefore: 2)
            #expect(after == [1, 1])
            #expect(await balancer.stats().workers.map(\.held) == [1, 0])
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("load held against a worker takes its room: a request waits for the hold to end, then runs there")
    func heldLoadTakesRoomUntilItEnds() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 1, backlog: 8))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { requesters in
                // One worker runs a request until released; the other holds load for 300 ms.
                requesters.addTask { _ = try await balancer.submit(held.operation()) }
                let running = await eventually(balancer) { $0.inFlight == 1 }
                let busy = try #require(running.workers.first { $0.pending == 1 }).id
                let other = 1 - busy
                let holdEnds = ContinuousClock.now + .milliseconds(300)
                balancer.holdLoad(on: other, until: holdEnds)
                // No worker has room: the next request waits, and starts on the held worker once the hold ends.
                let receipt = try await balancer.submitWithReceipt { ContinuousClock.now }
                #expect(receipt.worker == other)
                #expect(receipt.value >= holdEnds, "started \(holdEnds - receipt.value) before the hold ended")
                #expect(await balancer.stats().workers[busy].pending == 1, "the other request still runs")
                held.releaseAll()
                try await requesters.waitForAll()
            }
            let end = await eventually(balancer) { $0.inFlight == 0 && $0.completed == 2 }
            #expect(end.workers.allSatisfy { $0.pending == 0 })
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("holds ending at different times: a waiting request starts when its hold ends, with no completion between")
    func waitingRequestsFollowEachHoldEnd() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 1, backlog: 8))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { requesters in
                let start = ContinuousClock.now
                balancer.holdLoad(on: 0, until: start + .milliseconds(300))
                balancer.holdLoad(on: 1, until: start + .milliseconds(1_500))
                // A waits for the first hold to end (or, on a slow machine, finds it
                // ended), then runs on worker 0 until released.
                requesters.addTask { _ = try await balancer.submit(held.operation()) }
                await eventually(balancer) { $0.inFlight == 1 }
                // B can only have worker 1, once its hold ends: the expiry timer,
                // armed for the first hold's end, must arm again for the second's.
                let receipt = try await balancer.submitWithReceipt { ContinuousClock.now }
                #expect(receipt.worker == 1)
                #expect(receipt.value >= start + .milliseconds(1_500), "started before its hold ended")
                #expect(await balancer.stats().workers[0].pending == 1, "A still runs on worker 0")
                held.releaseAll()
                try await requesters.waitForAll()
            }
            let end = await eventually(balancer) { $0.inFlight == 0 && $0.completed == 2 }
            #expect(end.workers.allSatisfy { $0.pending == 0 && $0.held == 0 })
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("load held against a worker counts in its group, passing the group's idle workers over until the deadline")
    func heldLoadPassesAGroupOverUntilItsDeadline() async throws {
        // Two backends with two one-request connections each: workers 0, 1 and 2, 3.
        let balancer = Balancer(configuration: .init(workers: 4, capacity: 1, backlog: 8), groups: [0, 0, 1, 1])
        try await withRunning(balancer) { balancer in
            // A hold that has ended is given back before the next dispatch: group 0 comes first.
            let deadline = ContinuousClock.now + .milliseconds(100)
            balancer.holdLoad(on: 1, until: deadline)
            try await Task.sleep(until: deadline + .milliseconds(20), clock: .continuous)
            #expect(await balancer.stats().workers[1].held == 0, "an ended hold is gone from stats before any dispatch")
            #expect(try await balancer.submitWithReceipt { 0 }.worker == 0)
            _ = await eventually(balancer) { $0.completed == 1 }
            // While one lasts (a minute: longer than any busy machine takes here), the
            // held group's idle workers are passed over.
            balancer.holdLoad(on: 1, until: .now + .seconds(60))
            let ran = try await workersOneAtATime(balancer, 4, completedBefore: 1)
            #expect(ran == [2, 3, 2, 3], "group 0 holds a request no worker has in flight")
            #expect(await balancer.stats().workers.allSatisfy { $0.pending == 0 }, "no worker's pending changed")
            // The group's workers leave while it holds load: nothing breaks, the others serve.
            #expect(await balancer.removeWorker(0))
            #expect(await balancer.removeWorker(1))
            #expect(try await balancer.submitWithReceipt { 0 }.worker >= 2)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("round-robin gives each worker one request in turn")
    func roundRobinTakesTurns() async throws {
        let balancer = Balancer(configuration: .init(workers: 3, capacity: 4, strategy: .roundRobin))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Int.self) { group in
                var order: [Int] = []
                var before = await balancer.stats()
                for i in 1...6 {
                    group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                    let after = await eventually(balancer) { $0.inFlight == i }
                    let changed = zip(before.workers, after.workers).filter { $0.pending != $1.pending }
                    #expect(changed.count == 1)
                    order.append(changed.first?.0.id ?? -1)
                    before = after
                }
                #expect(order == [0, 1, 2, 0, 1, 2])
                held.releaseAll()
                while await balancer.stats().inFlight > 0 {
                    held.releaseAll()
                    try await Task.sleep(for: .milliseconds(1))
                }
                var workers: [Int] = []
                for try await worker in group { workers.append(worker) }
                #expect(workers.sorted() == [0, 0, 1, 1, 2, 2])
            }
        }
    }

    @Test("shared-queue holds one request per worker and the rest in the backlog, in order")
    func sharedQueueIsOnePerWorker() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 8, backlog: 10, strategy: .sharedQueue))
        let held = HeldOperations()
        let recorder = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<5 {
                    group.addTask {
                        let operation = held.operation()
                        _ = try await balancer.submit {
                            recorder.record("start \(i)")
                            return try await operation()
                        }
                    }
                    await eventually(balancer) { $0.inFlight == i + 1 }
                }
                let stats = await balancer.stats()
                #expect(stats.capacity == 1)
                #expect(stats.workers.map(\.pending) == [1, 1])
                #expect(stats.backlogDepth == 3)
                try await held.releaseUntilIdle(balancer)
                try await group.waitForAll()
                #expect(recorder.all.suffix(3) == ["start 2", "start 3", "start 4"], "the backlog is FIFO")
            }
        }
    }

    @Test("every strategy answers every request and keeps counts exact", arguments: Strategy.allCases)
    func everyStrategyAnswersEveryRequest(strategy: Strategy) async throws {
        let balancer = Balancer(
            configuration: .init(workers: 4, capacity: 2, backlog: 64, queueTimeout: .seconds(120), strategy: strategy))
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for requester in 0..<16 {
                    group.addTask {
                        for i in 0..<200 {
                            let answer = try await balancer.submit { (requester, i) }
                            #expect(answer == (requester, i))
                        }
                    }
                }
                try await group.waitForAll()
            }
            let stats = await eventually(balancer) { $0.inFlight == 0 && $0.workers.allSatisfy { $0.pending == 0 } }
            #expect(stats.completed == 16 * 200)
            #expect(stats.submitted == 16 * 200)
            #expect(stats.workers.reduce(0) { $0 + $1.completed } == 16 * 200)
            #expect(stats.workers.allSatisfy { $0.pendingMax <= stats.capacity })
            #expect(stats.overloaded == 0)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("an operation's error reaches its requester and counts as failed")
    func operationErrorsReachTheRequester() async throws {
        struct Boom: Error, Equatable {}
        let balancer = Balancer(configuration: .init(workers: 2))
        try await withRunning(balancer) { balancer in
            await #expect(throws: Boom.self) {
                try await balancer.submit { () async throws -> Int in throw Boom() }
            }
            let seven = try await balancer.submit { 7 }
            #expect(seven == 7)
            let stats = await eventually(balancer) { $0.inFlight == 0 && $0.completed + $0.failed == 2 }
            #expect(stats.failed == 1)
            #expect(stats.completed == 1)
            #expect(stats.workers.reduce(0) { $0 + $1.failed } == 1)
        }
    }

    @Test("the receipt names the worker and the times")
    func receiptNamesTheWorker() async throws {
        let balancer = Balancer(configuration: .init(workers: 3))
        try await withRunning(balancer) { balancer in
            let clock = ContinuousClock()
            let start = clock.now
            let receipt = try await balancer.submitWithReceipt {
                try await Task.sleep(for: .milliseconds(20))
                return "done"
            }
            let total = clock.now - start
            #expect(receipt.value == "done")
            #expect(receipt.worker == 0, "an idle pool gives the request to the lowest id")
            #expect(receipt.ran >= .milliseconds(20))
            #expect(receipt.queued >= .zero)
            #expect(receipt.queued + receipt.ran <= total)
        }
    }

    @Test("mean and variance of pending are those of the workers' counts")
    func meanAndVariance() {
        let workers = [1, 3, 5, 7].enumerated().map {
            BalancerStats.Worker(id: $0.offset, state: .active, pending: $0.element, pendingMax: 0, completed: 0, failed: 0)
        }
        let stats = BalancerStats(
            strategy: .leastLoaded, capacity: 8, workers: workers, backlogDepth: 0, backlogLimit: 0,
            queueTimeout: .seconds(1), submitted: 0, completed: 0, failed: 0, cancelled: 0, overloaded: 0,
            queueTimeouts: 0, shutDown: 0, inFlight: 0, shuttingDown: false
        )
        #expect(stats.pendingMean == 4)
        #expect(stats.pendingVariance == 5)
    }
}

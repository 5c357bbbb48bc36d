import Synchronization
import Testing

@testable import BalancerCore

/// What upstream pools need from the core: operations that know their worker,
/// workers marked down and up by health checks, and a latency-aware strategy.
@Suite("worker-aware operations, down and up, peak-EWMA")
struct UpstreamSupportTests {
    @Test("an operation learns its worker, and a worker runs one operation at a time")
    func operationsOwnTheirWorker() async throws {
        let workers = 4
        let inUse = Shared([Int](repeating: 0, count: workers))
        let overlaps = Shared(0)
        let balancer = Balancer(configuration: .init(workers: workers, capacity: 3))
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<16 {
                    group.addTask {
                        for _ in 0..<100 {
                            let receipt = try await balancer.submitOnWorker { worker -> Int in
                                let before = inUse.withLock { inUse in
                                    defer { inUse[worker] += 1 }
                                    return inUse[worker]
                                }
                                if before != 0 { overlaps.withLock { $0 += 1 } }
                                await Task.yield()
                                inUse.withLock { $0[worker] -= 1 }
                                return worker
                            }
                            #expect(receipt.value == receipt.worker)
                        }
                    }
                }
                try await group.waitForAll()
            }
        }
        #expect(overlaps.withLock { $0 } == 0, "a worker's resource is never used by two operations at once")
    }

    @Test("a worker marked down leaves the heap, its queued requests move, and it returns when marked up")
    func markDownAndUp() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 4, backlog: 8, strategy: .roundRobin))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<4 {
                    group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                    await eventually(balancer) { $0.inFlight == i + 1 }
                }
                while held.runningCount < 2 { try await Task.sleep(for: .milliseconds(1)) }
                #expect((await balancer.stats()).workers.map(\.pending) == [2, 2])

                #expect(await balancer.markDown(0))
                #expect(!(await balancer.markDown(0)), "already down")
                var stats = await balancer.stats()
                #expect(stats.workers.map(\.state) == [.down, .active])
                #expect(stats.workers.map(\.pending) == [1, 3], "worker 0 keeps its running request; its queued one moved")
                #expect(await balancer.poolIsValid())

                // New work goes only to the active worker.
                group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                stats = await eventually(balancer) { $0.inFlight == 5 }
                #expect(stats.workers.map(\.pending) == [1, 4])

                #expect(await balancer.markUp(0))
                #expect(!(await balancer.markUp(0)), "already up")
                #expect(await balancer.poolIsValid())
                group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                stats = await eventually(balancer) { $0.inFlight == 6 }
                #expect(stats.workers.map(\.pending) == [2, 4], "back in rotation")
                #expect(stats.workers.map(\.state) == [.active, .active])

                try await held.releaseUntilIdle(balancer)
                var workers: [Int] = []
                for try await worker in group { workers.append(worker) }
                #expect(workers.sorted() == [0, 0, 1, 1, 1, 1])

                // A worker marked down while running, whose last request then ends,
                // stays in the pool, down, until marked up.
                group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                let busy = await eventually(balancer) { $0.inFlight == 1 }.workers.first { $0.pending == 1 }!.id
                #expect(await balancer.markDown(busy))
                try await held.releaseUntilIdle(balancer)
                _ = try await group.next()
                let idle = await balancer.stats()
                #expect(idle.workers.map(\.id) == [0, 1])
                #expect(idle.workers.first { $0.id == busy }?.state == .down)
                #expect(await balancer.markUp(busy))
            }
            checkAccounting(await balancer.stats())
        }
    }

    @Test("with every worker down, a request is refused as unavailable at once; queued ones wait for a worker")
    func allDownIsUnavailable() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 1, backlog: 4, queueTimeout: .seconds(30)))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            let running = (0..<3).map { _ in Task { try await balancer.submitWithReceipt(held.operation()) } }
            await eventually(balancer) { $0.inFlight == 3 && $0.backlogDepth == 1 }
            #expect(await balancer.markDown(0))
            #expect(await balancer.markDown(1))
            await #expect(throws: BalancerError.unavailable) { try await balancer.submit { 1 } }
            #expect((await balancer.stats()).backlogDepth == 1, "the queued request still waits")

            #expect(await balancer.markUp(1))
            try await held.releaseUntilIdle(balancer)
            for request in running { _ = try await request.value }
            let stats = await balancer.stats()
            #expect(stats.unavailable == 1)
            #expect(stats.completed == 3)
            checkAccounting(stats)
        }
    }

    @Test("a worker added down takes no work until marked up; a waiting request then goes to it")
    func addWorkerDown() async throws {
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 1, backlog: 4, queueTimeout: .seconds(30)))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            let first = Task { try await balancer.submitWithReceipt(held.operation()).worker }
            let second = Task { try await balancer.submitWithReceipt(held.operation()).worker }
            await eventually(balancer) { $0.inFlight == 2 && $0.backlogDepth == 1 }
            let added = await balancer.addWorker(down: true)
            var stats = await balancer.stats()
            #expect(stats.workers.map(\.state) == [.active, .down])
            #expect(stats.backlogDepth == 1, "a down worker takes nothing from the backlog")
            #expect(await balancer.poolIsValid())

            #expect(await balancer.markUp(added))
            await eventually(balancer) { $0.backlogDepth == 0 }
            stats = await balancer.stats()
            #expect(stats.workers.map(\.pending) == [1, 1])
            try await held.releaseUntilIdle(balancer)
            #expect(Set([try await first.value, try await second.value]) == [0, added])
            checkAccounting(await balancer.stats())
        }
    }

    @Test("peak-EWMA gives a worker two hundred times slower a small share of the work")
    func peakEWMAAvoidsTheSlowWorker() async throws {
        func share(of strategy: Strategy) async throws -> (slow: Int, fast: Int) {
            // A short decay, so that a scheduling hiccup on a busy test machine
            // (a 1 ms sleep taking 30 ms) does not make a fast worker look slow for
            // long; and a slow worker far slower than such hiccups (under
            // ThreadSanitizer on a loaded 2-core machine they reach tens of ms),
            // so that even a fast worker's peak costs less than the slow one's.
            let balancer = Balancer(
                configuration: .init(workers: 4, capacity: 8, strategy: strategy, latencyDecay: .milliseconds(200))
            )
            return try await withRunning(balancer) { balancer in
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for _ in 0..<8 {
                        group.addTask {
                            for _ in 0..<40 {
                                _ = try await balancer.submitOnWorker { worker in
                                    try await Task.sleep(for: .milliseconds(worker == 0 ? 200 : 1))
                                }
                            }
                        }
                    }
                    try await group.waitForAll()
                }
                let stats = await balancer.stats()
                let slow = stats.workers[0].completed
                return (slow, stats.workers.dropFirst().reduce(0) { $0 + $1.completed } / 3)
            }
        }
        let ewma = try await share(of: .peakEWMA)
        #expect(ewma.slow * 4 < ewma.fast, "peak-EWMA: slow worker \(ewma.slow), fast workers \(ewma.fast) each")
    }

    @Test("the peak-EWMA estimate jumps to a peak and decays toward later samples")
    func latencyEstimateIsPeakSensitive() async throws {
        let balancer = Balancer(
            configuration: .init(workers: 1, strategy: .peakEWMA, latencyDecay: .milliseconds(50))
        )
        try await withRunning(balancer) { balancer in
            _ = try await balancer.submit { try await Task.sleep(for: .milliseconds(30)) }
            let peak = await eventually(balancer) { $0.workers[0].latencyEstimate != nil }.workers[0].latencyEstimate!
            #expect(peak >= .milliseconds(30))
            try await Task.sleep(for: .milliseconds(200))
            for _ in 0..<5 { _ = try await balancer.submit { 1 } }
            let later = await eventually(balancer) { $0.completed == 6 }.workers[0].latencyEstimate!
            #expect(later < peak / 4, "after four time constants the peak has mostly decayed: \(later) vs \(peak)")
        }
    }

    @Test("a request restricted to some workers runs at once on the least loaded of them with room, or ends busy")
    func restrictedRequestsRunOnlyWithRoom() async throws {
        let balancer = Balancer(configuration: .init(workers: 4, capacity: 2, backlog: 4))
        let held = HeldOperations()
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Int.self) { group in
                // Workers 0, 1, 2 get one request each; worker 3 stays idle.
                for i in 0..<3 {
                    group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                    await eventually(balancer) { $0.inFlight == i + 1 }
                }
                func restricted(to ids: Set<Int>) {
                    group.addTask {
                        try await balancer.submitOnWorker(ifRoomAmong: { ids.contains($0) }) { worker in
                            ran.record("ran on \(worker)")
                            _ = try await held.operation()()
                            return worker
                        }.worker
                    }
                }
                // Among 0 and 1 (pending 1 each), the tie goes to the least recently dispatched: 0.
                restricted(to: [0, 1])
                var stats = await eventually(balancer) { $0.inFlight == 4 }
                #expect(stats.workers.map(\.pending) == [2, 1, 1, 0])
                // Worker 3 is idle: it wins over 0, which is full anyway.
                restricted(to: [0, 3])
                stats = await eventually(balancer) { $0.inFlight == 5 }
                #expect(stats.workers.map(\.pending) == [2, 1, 1, 1])
                // Fill every worker and the backlog's head; a restricted request
                // whose only worker is full ends busy at once, never queued.
                for i in 0..<4 {
                    group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                    await eventually(balancer) { $0.inFlight == 6 + i }
                }
                stats = await balancer.stats()
                #expect(stats.workers.map(\.pending) == [2, 2, 2, 2])
                #expect(stats.backlogDepth == 1)
                await #expect(throws: BalancerError.busy) {
                    try await balancer.submitOnWorker(ifRoomAmong: { $0 == 3 }) { worker in
                        ran.record("busy ran on \(worker)")
                        return worker
                    }
                }
                stats = await balancer.stats()
                #expect(stats.busy == 1)
                #expect(stats.backlogDepth == 1, "the busy request never entered the backlog")
                #expect(stats.workers.map(\.pending) == [2, 2, 2, 2])
                checkAccounting(stats)

                try await held.releaseUntilIdle(balancer)
                var workers: [Int] = []
                for try await worker in group { workers.append(worker) }
                #expect(workers.count == 9)
            }
            #expect(ran.all.sorted() == ["ran on 0", "ran on 3"])
            let stats = await balancer.stats()
            #expect(stats.workers.map(\.pending) == [0, 0, 0, 0])
            #expect(stats.completed == 9)
            checkAccounting(stats)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("a restricted request queued on a worker that goes down ends busy, never in the backlog")
    func restrictedRequestTakenBackEndsBusy() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 2, backlog: 4))
        let held = HeldOperations()
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { _ = try await balancer.submitWithReceipt(held.operation()) }
                var stats = await eventually(balancer) { $0.inFlight == 1 }
                #expect(stats.workers.map(\.pending) == [1, 0])
                // Worker 0 has room for one more: the restricted request waits
                // on its channel behind the held one.
                group.addTask {
                    await #expect(throws: BalancerError.busy) {
                        try await balancer.submitOnWorker(ifRoomAmong: { $0 == 0 }) { worker in
                            ran.record("ran on \(worker)")
                            return worker
                        }
                    }
                }
                stats = await eventually(balancer) { $0.inFlight == 2 }
                #expect(stats.workers.map(\.pending) == [2, 0])
                #expect(await balancer.markDown(0))
                stats = await eventually(balancer) { $0.inFlight == 1 }
                #expect(stats.busy == 1)
                #expect(stats.backlogDepth == 0, "the restricted request did not move to the backlog")
                #expect(stats.workers.map(\.pending) == [1, 0], "and did not run on worker 1")
                checkAccounting(stats)
                try await held.releaseUntilIdle(balancer)
                try await group.waitForAll()
            }
            #expect(ran.all.isEmpty)
            let stats = await balancer.stats()
            #expect(stats.workers.map(\.pending) == [0, 0])
            #expect(stats.completed == 1)
            checkAccounting(stats)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("a restricted request with patience waits for an eligible worker and takes it ahead of the backlog")
    func patientRestrictedRequestWaitsAheadOfTheBacklog() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 1, backlog: 4))
        let held = HeldOperations()
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: String.self) { group in
                func plain(_ name: String) {
                    group.addTask { "\(name) on \(try await balancer.submitWithReceipt(held.operation()).worker)" }
                }
                // Held in start order: A on worker 0, B on worker 1.
                plain("A")
                await eventually(balancer) { $0.inFlight == 1 }
                plain("B")
                await eventually(balancer) { $0.inFlight == 2 }
                plain("P")
                var stats = await eventually(balancer) { $0.backlogDepth == 1 }
                group.addTask {
                    let receipt = try await balancer.submitOnWorker(ifRoomAmong: { $0 == 1 }, waitingAtMost: .seconds(60)) {
                        worker in
                        ran.record("W ran on \(worker)")
                        _ = try await held.operation()()
                        return worker
                    }
                    return "W on \(receipt.worker)"
                }
                stats = await eventually(balancer) { $0.inFlight == 4 }
                #expect(stats.backlogDepth == 1 && stats.waiting == 1, "W waits beside the backlog, not in it")
                #expect(stats.workers.map(\.pending) == [1, 1])
                checkAccounting(stats)

                // Worker 0 frees: W may not run there, so P (the backlog) takes it.
                #expect(held.releaseOne { _ in 0 })
                stats = await eventually(balancer) { $0.backlogDepth == 0 && held.runningCount == 2 }
                #expect(stats.inFlight == 3)
                #expect(ran.all.isEmpty, "W still waits for worker 1")
                // Q joins the backlog; then worker 1 frees and goes to W, ahead of Q.
                plain("Q")
                stats = await eventually(balancer) { $0.backlogDepth == 1 }
                #expect(held.releaseOne { _ in 0 })
                stats = await eventually(balancer) { _ in ran.all == ["W ran on 1"] }
                stats = await balancer.stats()
                #expect(stats.backlogDepth == 1, "Q still waits: the freed worker went to W")
                #expect(stats.waiting == 0)
                #expect(stats.workers.map(\.pending) == [1, 1])
                checkAccounting(stats)

                try await held.releaseUntilIdle(balancer)
                var answers: [String] = []
                for try await answer in group { answers.append(answer) }
                #expect(answers.sorted() == ["A on 0", "B on 1", "P on 0", "Q on 0", "W on 1"])
            }
            let stats = await balancer.stats()
            #expect(stats.completed == 5 && stats.busy == 0 && stats.inFlight == 0)
            #expect(stats.workers.map(\.pending) == [0, 0])
            checkAccounting(stats)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("a restricted request waits only while an eligible worker is active: none at once, or the last going down, ends it busy")
    func restrictedRequestWaitsOnlyForAnActiveEligibleWorker() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 1, backlog: 4))
        let held = HeldOperations()
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { _ = try await balancer.submitWithReceipt(held.operation()) }
                await eventually(balancer) { $0.inFlight == 1 }
                @Sendable func onWorker1(_ name: String) async throws {
                    _ = try await balancer.submitOnWorker(ifRoomAmong: { $0 == 1 }, waitingAtMost: .seconds(60)) { worker in
                        ran.record("\(name) ran on \(worker)")
                        _ = try await held.operation()()
                        return worker
                    }
                }
                // Worker 1 is down: nothing it waits for can come, so it ends at once, not after 60 s.
                #expect(await balancer.markDown(1))
                let start = ContinuousClock.now
                await #expect(throws: BalancerError.busy) { try await onWorker1("early") }
                #expect(ContinuousClock.now - start < .seconds(30))
                var stats = await balancer.stats()
                #expect(stats.busy == 1 && stats.inFlight == 1)
                checkAccounting(stats)

                // Worker 1 is up but busy: the next one waits; when worker 1 goes down, it ends.
                #expect(await balancer.markUp(1))
                group.addTask { _ = try await balancer.submitWithReceipt(held.operation()) }
                await eventually(balancer) { $0.inFlight == 2 && held.runningCount == 2 }
                group.addTask {
                    await #expect(throws: BalancerError.busy) { try await onWorker1("waiting") }
                }
                stats = await eventually(balancer) { $0.inFlight == 3 }
                #expect(stats.busy == 1, "it waits")
                #expect(await balancer.markDown(1))
                stats = await eventually(balancer) { $0.busy == 2 }
                #expect(stats.inFlight == 2 && stats.waiting == 0)
                checkAccounting(stats)
                held.releaseAll()
                try await group.waitForAll()
            }
            #expect(ran.all.isEmpty, "no restricted request ever ran")
            let stats = await eventually(balancer) { $0.inFlight == 0 }
            #expect(stats.completed == 2 && stats.busy == 2)
            #expect(stats.workers.map(\.pending) == [0, 0])
            checkAccounting(stats)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("a waiting restricted request ends busy when its patience runs out or a shutdown begins, and cancelled when its caller is")
    func waitingRestrictedRequestEnds() async throws {
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 1, backlog: 4))
        let held = HeldOperations()
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { _ = try await balancer.submitWithReceipt(held.operation()) }
                await eventually(balancer) { $0.inFlight == 1 }
                @Sendable func waiter(_ name: String, patience: Duration) async throws {
                    _ = try await balancer.submitOnWorker(ifRoomAmong: { _ in true }, waitingAtMost: patience) { worker in
                        ran.record("\(name) ran on \(worker)")
                        return worker
                    }
                }
                // Patience runs out.
                await #expect(throws: BalancerError.busy) { try await waiter("short", patience: .milliseconds(30)) }
                var stats = await balancer.stats()
                #expect(stats.busy == 1 && stats.inFlight == 1)
                checkAccounting(stats)

                // The caller is cancelled while it waits.
                let cancelled = Task { try await waiter("cancelled", patience: .seconds(60)) }
                await eventually(balancer) { $0.inFlight == 2 }
                cancelled.cancel()
                await #expect(throws: BalancerError.cancelled) { try await cancelled.value }
                stats = await eventually(balancer) { $0.inFlight == 1 }
                #expect(stats.cancelled == 1 && stats.busy == 1)
                checkAccounting(stats)

                // A shutdown begins while one waits.
                group.addTask {
                    await #expect(throws: BalancerError.busy) { try await waiter("drained", patience: .seconds(60)) }
                }
                await eventually(balancer) { $0.inFlight == 2 }
                balancer.shutdown(gracePeriod: .seconds(60))
                stats = await eventually(balancer) { $0.inFlight == 1 }
                #expect(stats.busy == 2)
                #expect(stats.workers.map(\.pending) == [1])
                checkAccounting(stats)
                held.releaseAll()
                try await group.waitForAll()
            }
            #expect(ran.all.isEmpty, "no waiting request ever ran")
            let stats = await balancer.stats()
            #expect(stats.completed == 1 && stats.inFlight == 0)
            checkAccounting(stats)
        }
    }

    @Test("a restricted request submitted without waiting calls back once: its receipt or error, busy, cancelled, or shutting down")
    func restrictedRequestCallsBack() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 1, backlog: 4))
        let held = HeldOperations()
        let ends = Shared<[String]>([])
        let record = { @Sendable (name: String) in recordEnd(name, into: ends) }
        @Sendable func ended(_ count: Int) async -> [String] {
            let deadline = ContinuousClock.now + .seconds(30)
            while ends.withLock({ $0.count }) < count && ContinuousClock.now < deadline {
                try? await Task.sleep(for: .milliseconds(1))
            }
            return ends.withLock { $0 }
        }
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                // Runs on the one eligible worker and calls back with its receipt.
                balancer.submitOnWorker(ifRoomAmong: { $0 == 1 }, cancellation: Cancellation(), { $0 * 10 }, onEnd: record("ran"))
                #expect(await ended(1) == ["ran: 10 on 1"])
                // (It calls back before its worker reports it done.)
                await eventually(balancer) { $0.completed == 1 && $0.inFlight == 0 }
                // Worker 1 busy: no room and no patience, so busy at once.
                group.addTask { _ = try await balancer.submitOnWorker(ifRoomAmong: { $0 == 1 }) { _ in try await held.operation()() } }
                await eventually(balancer) { $0.inFlight == 1 }
                balancer.submitOnWorker(ifRoomAmong: { $0 == 1 }, cancellation: Cancellation(), { $0 }, onEnd: record("full"))
                #expect(await ended(2).last == "full: busy")
                // Waiting for room, then withdrawn; and one cancelled before it was submitted.
                let stop = Cancellation()
                balancer.submitOnWorker(
                    ifRoomAmong: { $0 == 1 }, waitingAtMost: .seconds(60), cancellation: stop, { $0 }, onEnd: record("waiting"))
                await eventually(balancer) { $0.waiting == 1 }
                stop.cancel()
                #expect(await ended(3).last == "waiting: cancelled")
                let early = Cancellation()
                early.cancel()
                balancer.submitOnWorker(ifRoomAmong: { _ in true }, cancellation: early, { $0 }, onEnd: record("early"))
                #expect(await ended(4).last == "early: cancelled")
                // An operation that throws: its error, from the worker.
                struct Broken: Error {}
                balancer.submitOnWorker(
                    ifRoomAmong: { $0 == 0 }, cancellation: Cancellation(), { _ in throw Broken() }, onEnd: record("broken"))
                #expect(await ended(5).last == "broken: Broken()")
                held.releaseAll()
                try await group.waitForAll()
            }
            var stats = await eventually(balancer) { $0.inFlight == 0 }
            #expect(stats.completed == 2 && stats.failed == 1 && stats.busy == 1 && stats.cancelled == 2, "\(stats)")
            // Shutting down: answered before the call returns.
            balancer.shutdown(gracePeriod: .seconds(30))
            balancer.submitOnWorker(ifRoomAmong: { _ in true }, cancellation: Cancellation(), { $0 }, onEnd: record("late"))
            #expect(ends.withLock { $0.last } == "late: shutting_down")
            #expect(ends.withLock { $0.count } == 6, "each called back once")
            stats = await balancer.stats()
            #expect(stats.shutDown == 1, "\(stats)")
            checkAccounting(stats)
        }
    }

    @Test("a plain request submitted without waiting queues in the backlog and calls back once: its receipt, or cancelled")
    func plainRequestCallsBack() async throws {
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 1, backlog: 4))
        let held = HeldOperations()
        let ends = Shared<[String]>([])
        let record = { @Sendable (name: String) in recordEnd(name, into: ends) }
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                // The only worker is busy: both wait in the backlog, unlike a restricted request.
                group.addTask { _ = try await balancer.submit { try await held.operation()() } }
                await eventually(balancer) { $0.inFlight == 1 }
                balancer.submitOnWorker(cancellation: Cancellation(), { $0 + 7 }, onEnd: record("queued"))
                let stop = Cancellation()
                balancer.submitOnWorker(cancellation: stop, { $0 }, onEnd: record("withdrawn"))
                var stats = await eventually(balancer) { $0.backlogDepth == 2 }
                #expect(stats.workers.map(\.pending) == [1])
                stop.cancel()
                await eventually(balancer) { $0.backlogDepth == 1 }
                #expect(ends.withLock { $0 } == ["withdrawn: cancelled"])
                held.releaseAll()
                try await group.waitForAll()
                stats = await eventually(balancer) { $0.inFlight == 0 }
                #expect(ends.withLock { $0 } == ["withdrawn: cancelled", "queued: 7 on 0"], "each called back once")
                #expect(stats.completed == 2 && stats.cancelled == 1, "\(stats)")
                checkAccounting(stats)
            }
        }
    }

    @Test("a Cancellation stops its request from another task: queued never runs, running sees cancellation, early never starts")
    func cancellationFromAnotherTask() async throws {
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 2, backlog: 4))
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            // A: running, until its cancellation stops it.
            let stopA = Cancellation()
            let a = Task {
                try await balancer.submitOnWorker(cancellation: stopA) { worker in
                    ran.record("A started")
                    do {
                        try await Task.sleep(for: .seconds(60))
                    } catch {
                        ran.record("A saw cancellation")
                        throw error
                    }
                    return worker
                }
            }
            await eventually(balancer) { _ in ran.all == ["A started"] }
            // B: queued behind A on the only worker.
            let stopB = Cancellation()
            let b = Task {
                try await balancer.submitOnWorker(cancellation: stopB) { worker in
                    ran.record("B ran")
                    return worker
                }
            }
            var stats = await eventually(balancer) { $0.workers[0].pending == 2 }
            stopB.cancel()
            await #expect(throws: BalancerError.cancelled) { try await b.value }
            stats = await eventually(balancer) { $0.workers[0].pending == 1 }
            #expect(stats.cancelled == 1)
            checkAccounting(stats)

            stopA.cancel()
            await #expect(throws: BalancerError.cancelled) { try await a.value }
            stats = await eventually(balancer) { $0.workers[0].pending == 0 && ran.count("A saw cancellation") == 1 }
            #expect(stats.cancelled == 2 && stats.inFlight == 0)
            #expect(!a.isCancelled && !b.isCancelled, "the requesters' own tasks were never cancelled")

            // Cancelled before it is submitted: it never runs.
            let early = Cancellation()
            early.cancel()
            await #expect(throws: BalancerError.cancelled) {
                try await balancer.submitOnWorker(cancellation: early) { worker in
                    ran.record("early ran")
                    return worker
                }
            }
            // The worker (its task restarted after the cancellation) still serves.
            let receipt = try await balancer.submitOnWorker(cancellation: Cancellation()) { $0 }
            #expect(receipt.value == 0)
            stats = await eventually(balancer) { $0.completed == 1 && $0.inFlight == 0 }
            #expect(stats.cancelled == 3)
            #expect(stats.workers.map(\.pending) == [0])
            checkAccounting(stats)
        }
        #expect(ran.all == ["A started", "A saw cancellation"])
    }

    @Test("decayWeight approximates exp(-x)")
    func decayWeightApproximatesExp() {
        let expected: [(Double, Double)] = [(0, 1), (0.5, 0.606_530_66), (1, 0.367_879_44), (2, 0.135_335_28), (5, 0.006_737_95)]
        for (x, value) in expected {
            #expect(abs(decayWeight(x) - value) < value * 0.02 + 1e-4, "x = \(x)")
        }
        #expect(decayWeight(2000) == 0)
    }
}

/// A callback for a request submitted without waiting that appends
/// "name: value on worker", or "name: error code", to `ends`.
private func recordEnd(_ name: String, into ends: Shared<[String]>) -> @Sendable (Result<Receipt<Int>, any Error>) -> Void {
    { result in
        let text: String
        switch result {
        case .success(let receipt): text = "\(name): \(receipt.value) on \(receipt.worker)"
        case .failure(let error): text = "\(name): \((error as? BalancerError)?.code ?? "\(error)")"
        }
        ends.withLock { $0.append(text) }
    }
}

import Synchronization
import Testing

@testable import BalancerCore

@Suite("cancellation, workers at runtime, shutdown")
struct LifecycleTests {
    @Test("a request cancelled while queued never runs, and counts are restored", arguments: [false, true])
    func cancelledWhileQueuedNeverRuns(inBacklog: Bool) async throws {
        // One worker with room for two: the second request queues on the worker;
        // with capacity 1 it waits in the backlog instead.
        let balancer = Balancer(configuration: .init(workers: 1, capacity: inBacklog ? 1 : 2, backlog: 4))
        let held = HeldOperations()
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            let first = Task { try await balancer.submit(held.operation()) }
            await eventually(balancer) { $0.inFlight == 1 }
            while held.runningCount == 0 { try await Task.sleep(for: .milliseconds(1)) }
            let before = await balancer.stats()

            let queued = Task { try await balancer.submit { ran.record("queued ran"); return 0 } }
            let during = await eventually(balancer) { $0.inFlight == 2 }
            #expect(during.backlogDepth == (inBacklog ? 1 : 0))
            #expect(during.workers[0].pending == (inBacklog ? 1 : 2))

            queued.cancel()
            await #expect(throws: BalancerError.cancelled) { try await queued.value }
            let after = await eventually(balancer) { $0.cancelled == 1 }
            #expect(after.workers.map(\.pending) == before.workers.map(\.pending), "pending is restored")
            #expect(after.backlogDepth == 0)
            #expect(after.inFlight == 1)
            checkAccounting(after)

            held.releaseAll()
            #expect(try await first.value == 1)
        }
        #expect(ran.all.isEmpty, "the cancelled request never ran")
    }

    @Test("a request cancelled while running sees the cancellation; counts are restored; the worker goes on")
    func cancelledWhileRunningSeesIt() async throws {
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 4))
        let seen = Recorder()
        try await withRunning(balancer) { balancer in
            let running = Task {
                try await balancer.submit { () async throws -> Int in
                    seen.record("started")
                    do {
                        try await Task.sleep(for: .seconds(60))
                    } catch is CancellationError {
                        seen.record("saw cancellation")
                        throw CancellationError()
                    }
                    return 1
                }
            }
            while seen.count("started") == 0 { try await Task.sleep(for: .milliseconds(1)) }
            running.cancel()
            await #expect(throws: BalancerError.cancelled) { try await running.value }
            let after = await eventually(balancer) { $0.workers[0].pending == 0 }
            #expect(seen.count("saw cancellation") == 1)
            #expect(after.cancelled == 1)
            #expect(after.inFlight == 0)
            checkAccounting(after)

            // The same worker takes and finishes new work: its task was replaced, not lost.
            for i in 0..<20 {
                let receipt = try await balancer.submitWithReceipt { i }
                #expect(receipt.value == i)
                #expect(receipt.worker == 0)
                #expect(!Task.isCancelled)
            }
        }
    }

    @Test("drain and remove under load: no request lost, heap valid, workers leave when empty")
    func drainAndRemoveUnderLoad() async throws {
        let balancer = Balancer(configuration: .init(workers: 6, capacity: 3, backlog: 256, queueTimeout: .seconds(60)))
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Int.self) { group in
                for requester in 0..<24 {
                    group.addTask {
                        var answered = 0
                        for i in 0..<400 {
                            let answer = try await balancer.submit { () async throws -> Int in
                                if i % 5 == 0 { try await Task.sleep(for: .microseconds(200)) }
                                return requester &* 1000 &+ i
                            }
                            #expect(answer == requester &* 1000 &+ i)
                            answered += 1
                        }
                        return answered
                    }
                }
                try await Task.sleep(for: .milliseconds(20))
                #expect(await balancer.drainWorker(0))
                #expect(await balancer.poolIsValid())
                #expect(await balancer.removeWorker(1))
                #expect(await balancer.poolIsValid())
                #expect(!(await balancer.removeWorker(1)), "removing twice is refused")
                #expect(!(await balancer.drainWorker(99)), "an unknown worker is refused")
                let added = await balancer.addWorker()
                #expect(added == 6)
                #expect(await balancer.poolIsValid())
                let mid = await balancer.stats()
                #expect(mid.workers.allSatisfy { $0.id != 0 || $0.state == .draining })
                checkAccounting(mid)

                let answered = try await group.reduce(0, +)
                #expect(answered == 24 * 400, "no request lost")
            }
            let stats = await eventually(balancer) { $0.inFlight == 0 && $0.workers.allSatisfy { $0.pending == 0 } }
            #expect(!stats.workers.contains { $0.id == 0 || $0.id == 1 }, "drained and removed workers left the pool")
            #expect(stats.workers.map(\.id) == [2, 3, 4, 5, 6])
            #expect(stats.completed == 24 * 400)
            #expect(stats.completed == stats.submitted)
            #expect(await balancer.poolIsValid())
        }
    }

    @Test("removing a worker sends its queued requests to the others")
    func removeRedispatchesQueuedRequests() async throws {
        let balancer = Balancer(configuration: .init(workers: 2, capacity: 5, backlog: 8, strategy: .roundRobin))
        let held = HeldOperations()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<6 {
                    group.addTask { try await balancer.submitWithReceipt(held.operation()).worker }
                    await eventually(balancer) { $0.inFlight == i + 1 }
                }
                #expect((await balancer.stats()).workers.map(\.pending) == [3, 3])
                while held.runningCount < 2 { try await Task.sleep(for: .milliseconds(1)) }
                #expect(await balancer.removeWorker(0))
                let after = await balancer.stats()
                #expect(after.workers.map(\.pending) == [1, 5], "worker 0 keeps only its running request; worker 1 takes two")
                #expect(after.workers[0].state == .removing)
                #expect(after.backlogDepth == 0)
                try await held.releaseUntilIdle(balancer)
                var workers: [Int] = []
                for try await worker in group { workers.append(worker) }
                #expect(workers.filter { $0 == 0 }.count == 1)
                #expect(workers.filter { $0 == 1 }.count == 5)
            }
            let stats = await eventually(balancer) { $0.workers.count == 1 }
            #expect(stats.workers.map(\.id) == [1])
        }
    }

    @Test("shutdown under load: every admitted request is answered, none admitted after")
    func shutdownUnderLoad() async throws {
        let balancer = Balancer(configuration: .init(workers: 4, capacity: 2, backlog: 64, queueTimeout: .seconds(60)))
        let outcomes = try await withThrowingTaskGroup(of: (values: Int, refused: Int, other: Int).self) { group in
            group.addTask {
                await balancer.run()
                return (0, 0, 0)
            }
            for _ in 0..<32 {
                group.addTask {
                    var values = 0
                    while true {
                        do {
                            _ = try await balancer.submit { () async throws -> Int in
                                try await Task.sleep(for: .microseconds(300))
                                return 1
                            }
                            values += 1
                        } catch BalancerError.shuttingDown {
                            return (values, 1, 0)
                        } catch {
                            return (values, 0, 1)
                        }
                    }
                }
            }
            try await Task.sleep(for: .milliseconds(100))
            balancer.shutdown(gracePeriod: .seconds(30))
            var total = (values: 0, refused: 0, other: 0)
            for try await outcome in group {
                total.values += outcome.values
                total.refused += outcome.refused
                total.other += outcome.other
            }
            return total
        }
        #expect(outcomes.refused == 32, "every requester was refused once shutdown began")
        #expect(outcomes.other == 0)
        let stats = await balancer.stats()
        #expect(stats.shuttingDown)
        #expect(stats.completed == outcomes.values, "every admitted request was answered with its value")
        #expect(stats.inFlight == 0)
        #expect(stats.shutDown == 32)
        checkAccounting(stats)
        await #expect(throws: BalancerError.shuttingDown) { try await balancer.submit { 1 } }
    }

    @Test("past the grace period, what remains ends with shuttingDown and running work is cancelled")
    func gracePeriodEndsTheRest() async throws {
        // The queue timeout is far beyond the test, so only the shutdown can end what waits.
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 2, backlog: 4, queueTimeout: .seconds(120)))
        let seen = Recorder()
        let results = await withTaskGroup(of: Result<Int, BalancerError>?.self) { group in
            group.addTask {
                await balancer.run()
                return nil
            }
            for _ in 0..<4 {
                group.addTask {
                    do {
                        return .success(
                            try await balancer.submit { () async throws -> Int in
                                do {
                                    try await Task.sleep(for: .seconds(60))
                                } catch {
                                    seen.record("cancelled")
                                    throw error
                                }
                                return 1
                            })
                    } catch {
                        return .failure(error as! BalancerError)
                    }
                }
            }
            await eventually(balancer) { $0.inFlight == 4 }
            let clock = ContinuousClock()
            let start = clock.now
            balancer.shutdown(gracePeriod: .milliseconds(200))
            var results: [Result<Int, BalancerError>] = []
            for await result in group {
                if let result { results.append(result) }
            }
            #expect(clock.now - start < .seconds(10), "the grace period bounds the shutdown")
            return results
        }
        #expect(results.count == 4)
        #expect(results.allSatisfy { $0 == .failure(.shuttingDown) })
        try await Task.sleep(for: .milliseconds(50))
        #expect(seen.count("cancelled") == 1, "the running operation saw cancellation")
        let stats = await balancer.stats()
        #expect(stats.shutDown == 4)
        #expect(stats.backlogDepth == 0)
    }

    @Test("cancelling the task that runs the balancer stops it and answers everything")
    func cancellingRunStops() async throws {
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 1, backlog: 2))
        let held = HeldOperations()
        let runner = Task { await balancer.run() }
        let requests = (0..<3).map { _ in
            Task { try await balancer.submit(held.operation()) }
        }
        await eventually(balancer) { $0.inFlight == 3 }
        runner.cancel()
        await runner.value
        for request in requests {
            await #expect(throws: BalancerError.shuttingDown) { try await request.value }
        }
        held.releaseAll()
    }
}

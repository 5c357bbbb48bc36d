import Synchronization
import Testing

@testable import BalancerCore

@Suite("open load: stress, overload, queue timeout")
struct OpenLoadTests {
    @Test("64 requesters x 10,000 requests: each gets its own answer, counts are exact, nothing overloaded")
    func stress() async throws {
        let requesters = 64
        let perRequester = 10_000
        let balancer = Balancer(configuration: .init(workers: 8, capacity: 4, backlog: 64, queueTimeout: .seconds(60)))
        try await withRunning(balancer) { balancer in
            let wrong = try await withThrowingTaskGroup(of: Int.self) { group in
                for requester in 0..<requesters {
                    group.addTask {
                        var rng = SplitMix64(seed: UInt64(requester))
                        var wrong = 0
                        for i in 0..<perRequester {
                            // Random tiny work: mostly a yield, sometimes a sleep of a few microseconds.
                            let pause = Int.random(in: 0..<64, using: &rng)
                            let answer = try await balancer.submit { () async throws -> Int in
                                if pause == 0 {
                                    try await Task.sleep(for: .microseconds(20))
                                } else if pause < 8 {
                                    await Task.yield()
                                }
                                return requester * perRequester + i
                            }
                            if answer != requester * perRequester + i { wrong += 1 }
                        }
                        return wrong
                    }
                }
                return try await group.reduce(0, +)
            }
            #expect(wrong == 0, "every requester gets exactly its own answers")
        }
        // run() has returned: every completion has been counted.
        let stats = await balancer.stats()
        #expect(stats.submitted == requesters * perRequester)
        #expect(stats.completed == stats.submitted)
        #expect(stats.overloaded == 0)
        #expect(stats.queueTimeouts == 0)
        #expect(stats.inFlight == 0)
        #expect(stats.workers.allSatisfy { $0.pending == 0 })
        #expect(stats.workers.allSatisfy { $0.pendingMax <= 4 })
        #expect(stats.workers.reduce(0) { $0 + $1.completed } == stats.completed)
    }

    @Test("2 workers, C = 2, Q = 4: the 9th request is overloaded at once; backlog past T times out; neither runs")
    func overloadAndQueueTimeout() async throws {
        let balancer = Balancer(
            configuration: .init(workers: 2, capacity: 2, backlog: 4, queueTimeout: .seconds(2))
        )
        let held = HeldOperations()
        let ran = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: (Int, Result<Int, BalancerError>).self) { group in
                for i in 0..<8 {
                    let operation = held.operation()
                    group.addTask {
                        do {
                            return (i, .success(try await balancer.submit { ran.record("\(i)"); return try await operation() }))
                        } catch let error as BalancerError {
                            return (i, .failure(error))
                        }
                    }
                    await eventually(balancer) { $0.inFlight == i + 1 }
                }
                let full = await balancer.stats()
                #expect(full.workers.map(\.pending) == [2, 2])
                #expect(full.backlogDepth == 4)

                await #expect(throws: BalancerError.overloaded) {
                    try await balancer.submit { ran.record("ninth"); return 0 }
                }
                // At once: before anything in the backlog could have timed out.
                let afterRefusal = await balancer.stats()
                #expect(afterRefusal.backlogDepth == 4 && afterRefusal.queueTimeouts == 0, "overloaded without a wait")

                // The four in the backlog pass T and end with queueTimeout.
                var timedOut: [Int] = []
                for _ in 0..<4 {
                    let (i, result) = try await group.next()!
                    #expect(result == .failure(.queueTimeout))
                    timedOut.append(i)
                }
                #expect(timedOut.sorted() == [4, 5, 6, 7], "the backlog holds the last four")

                held.releaseAll()
                while (await balancer.stats()).inFlight > 0 {
                    held.releaseAll()
                    try await Task.sleep(for: .milliseconds(1))
                }
                for try await (_, result) in group {
                    #expect(result == .success(1))
                }
            }
            let stats = await eventually(balancer) { $0.inFlight == 0 }
            #expect(stats.overloaded == 1)
            #expect(stats.queueTimeouts == 4)
            #expect(stats.completed == 4)
            #expect(stats.submitted == 9)
            checkAccounting(stats)
        }
        #expect(Set(ran.all) == ["0", "1", "2", "3"], "neither the overloaded nor the timed-out requests ran")
    }

    @Test("a backlog request is dispatched on the next completion, oldest first")
    func backlogGoesOnTheNextCompletion() async throws {
        let balancer = Balancer(configuration: .init(workers: 1, capacity: 1, backlog: 3, queueTimeout: .seconds(30)))
        let held = HeldOperations()
        let order = Recorder()
        try await withRunning(balancer) { balancer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<4 {
                    let operation = held.operation()
                    group.addTask { _ = try await balancer.submit { order.record("\(i)"); return try await operation() } }
                    await eventually(balancer) { $0.inFlight == i + 1 }
                }
                #expect((await balancer.stats()).backlogDepth == 3)
                for remaining in stride(from: 3, through: 0, by: -1) {
                    while !held.releaseOne({ _ in 0 }) { try await Task.sleep(for: .milliseconds(1)) }
                    await eventually(balancer) { $0.backlogDepth == max(remaining - 1, 0) && $0.inFlight == remaining }
                }
                try await group.waitForAll()
            }
        }
        #expect(order.all == ["0", "1", "2", "3"])
    }
}

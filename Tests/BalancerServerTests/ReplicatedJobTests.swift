import BalancerCore
import BalancerServer
import Foundation
import Testing

@Suite("POST /jobs with replicas: first answer wins")
struct ReplicatedJobTests {
    /// `/stats` over HTTP, as a client reads it.
    private func stats(_ server: TestServer) async throws -> [String: any Sendable] {
        try await request(server.url("/stats")).json
    }

    private func int(_ object: Any?, _ key: String) -> Int? {
        ((object as? [String: Any])?[key] as? NSNumber)?.intValue
    }

    @Test("a replicated sleep gives one answer naming the winner; the copy queued behind other work never runs")
    func replicatedSleep() async throws {
        try await withServer({ $0.workers = 2; $0.capacity = 2 }) { server in
            // Worker 0 runs a long sleep: the second copy queues behind it.
            try await whileAJobRuns(server) {
                #expect(try await eventually { await server.balancer.stats().workers.map(\.pending) == [1, 0] })

                let result = try await postJob(server, #"{"op":"sleep","ms":20,"replicas":2}"#)
                #expect(result.status == 200, "\(result.text)")
                let json = try result.json
                #expect((json["result"] as? NSNumber)?.intValue == 20)
                #expect((json["worker"] as? NSNumber)?.intValue == 1, "the idle worker's copy wins")
                #expect((json["replicas"] as? NSNumber)?.intValue == 2)

                #expect(try await eventually { await server.balancer.stats().workers.map(\.pending) == [1, 0] })
                let during = try await stats(server)
                #expect(int(during["replicas"], "replicated") == 1)
                #expect(int(during["replicas"], "wins") == 1)
                #expect(int(during["replicas"], "cancelled_copies") == 1)
                #expect(int(during["totals"], "in_flight") == 1)
                let workers = try #require(during["workers"] as? [[String: Any]])
                #expect(workers.map { ($0["pending_max"] as? NSNumber)?.intValue } == [2, 1], "the copy was queued on worker 0")
                #expect(workers.map { ($0["completed"] as? NSNumber)?.intValue } == [0, 1])
            }  // cancels the long sleep: worker 0 is free, and would run the copy had it been kept

            // The requester of the cancelled sleep is answered at once; its
            // worker's pending falls when the worker reports done, a moment later.
            #expect(try await eventually {
                let stats = await server.balancer.stats()
                return stats.inFlight == 0 && stats.workers.allSatisfy { $0.pending == 0 }
            })
            let after = try await stats(server)
            #expect(int(after["totals"], "submitted") == 2)
            #expect(int(after["totals"], "completed") == 1)
            #expect(int(after["totals"], "cancelled") == 1, "the long sleep")
            #expect(int(after["totals"], "in_flight") == 0)
            #expect(int(after["replicas"], "cancelled_copies") == 1)
            let idle = try #require(after["workers"] as? [[String: Any]])
            #expect(idle.allSatisfy { ($0["pending"] as? NSNumber)?.intValue == 0 })
            #expect(idle.map { ($0["completed"] as? NSNumber)?.intValue } == [0, 1], "the queued copy never ran")

            let text = try await request(server.url("/stats?format=text")).text
            #expect(text.contains("replicas replicated 1  wins 1  cancelled_copies 1  out_of_range 0"), "\(text)")
        }
    }

    @Test("every copy runs on its own worker and the answer says how many ran")
    func copiesOnDistinctWorkers() async throws {
        try await withServer({ $0.workers = 3 }) { server in
            let result = try await postJob(server, #"{"op":"multiply","x":6,"y":7,"replicas":3}"#)
            #expect(result.status == 200, "\(result.text)")
            #expect((try result.json["result"] as? NSNumber)?.intValue == 42)
            #expect((try result.json["replicas"] as? NSNumber)?.intValue == 3)
            #expect(try await eventually {
                let stats = await server.balancer.stats()
                return stats.inFlight == 0 && stats.workers.allSatisfy { $0.pending == 0 }
            })
            let stats = await server.balancer.stats()
            #expect(stats.workers.allSatisfy { $0.pendingMax == 1 }, "one copy per worker")
            #expect(stats.submitted == 1 && stats.completed == 1 && stats.replicaWins == 1)

            let plain = try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#)
            #expect(try plain.json["replicas"] == nil, "a plain job's answer is unchanged")
        }
    }

    @Test("replicas out of range or not a whole number is a 400 naming the field", arguments: [
        "0", "-1", "4", "\"two\"", "1.5", "null", "99999999999999999999",
    ])
    func badReplicas(value: String) async throws {
        try await withServer({ $0.workers = 3 }) { server in
            let result = try await postJob(server, #"{"op":"sleep","ms":1,"replicas":\#(value)}"#)
            #expect(result.status == 400, "\(result.text)")
            #expect(result.errorCode == "bad_field")
            let message = try #require(try result.json["message"] as? String)
            #expect(message.hasPrefix("field \"replicas\""), "\(message)")
            let stats = await server.balancer.stats()
            #expect(stats.completed == 0 && stats.inFlight == 0, "nothing ran")
            #expect(stats.workers.allSatisfy { $0.completed == 0 && $0.pending == 0 })
            // Whole numbers reach the balancer, which knows the active workers; the rest stop at decoding.
            let reachedBalancer = Int(value) != nil && Int64(value) != nil
            #expect(stats.replicasOutOfRange == (reachedBalancer ? 1 : 0))
            #expect(stats.submitted == stats.replicasOutOfRange)
        }
    }
}

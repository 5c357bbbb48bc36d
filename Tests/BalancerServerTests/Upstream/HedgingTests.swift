import BalancerCore
import Foundation
import NIOCore
import NIOHTTP1
import Testing

@testable import BalancerServer

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The pool's `hedging` figures and every worker's `pending`, from `/stats`.
private struct HedgeFigures: Equatable, CustomStringConvertible {
    var hedged = 0
    var copies = 0
    var wins: [Int] = []
    var losers = 0
    var skipped = 0
    var overBudget = 0
    var declined = 0
    var waiting = 0
    var pending: [Int] = []
    var retries: [Int] = []
    var losersFinished = 0

    static func read(_ server: TestServer) async throws -> HedgeFigures {
        let stats = try await request(server.url("/stats"))
        let upstream = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first)
        let hedging = try #require(upstream["hedging"] as? [String: any Sendable])
        let workers = try #require(upstream["workers"] as? [[String: any Sendable]])
        let backends = try #require(upstream["backends"] as? [[String: any Sendable]])
        return HedgeFigures(
            hedged: hedging["hedged_requests"] as? Int ?? -1,
            copies: hedging["copies_sent"] as? Int ?? -1,
            wins: hedging["wins_by_copy"] as? [Int] ?? [],
            losers: hedging["cancelled_losers"] as? Int ?? -1,
            skipped: hedging["skipped"] as? Int ?? -1,
            overBudget: hedging["over_budget"] as? Int ?? -1,
            declined: hedging["declined"] as? Int ?? -1,
            waiting: hedging["waiting_copies"] as? Int ?? -1,
            pending: workers.map { $0["pending"] as? Int ?? -1 },
            retries: backends.map { $0["retries"] as? Int ?? -1 },
            losersFinished: hedging["losers_finished"] as? Int ?? -1
        )
    }

    var description: String {
        "hedged \(hedged) copies \(copies) wins \(wins) losers \(losers) skipped \(skipped) over budget \(overBudget) "
            + "declined \(declined) waiting \(waiting) pending \(pending) retries \(retries) "
            + "losers finished \(losersFinished)"
    }
}

/// The pool's `hedging.delay_us` in `/stats` (nil when it is null).
private func hedgeDelay(_ server: TestServer) async throws -> Int? {
    let stats = try await request(server.url("/stats"))
    let upstream = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first)
    let hedging = try #require(upstream["hedging"] as? [String: any Sendable])
    return hedging["delay_us"] as? Int
}

/// Waits until every upstream worker's pending is back to 0, then returns the figures.
private func settled(_ server: TestServer) async throws -> HedgeFigures {
    var figures = try await HedgeFigures.read(server)
    let deadline = ContinuousClock.now + .seconds(20)
    while figures.pending.contains(where: { $0 != 0 }) && ContinuousClock.now < deadline {
        try await Task.sleep(for: .milliseconds(20))
        figures = try await HedgeFigures.read(server)
    }
    return figures
}

/// A hedged request whose copy has to wait for a worker: a POST (never copied)
/// holds `busy`'s only worker until `busy.releasePauses()`, then a GET of `path`
/// goes to `other` (the pool's other backend), with copies due after `after`.
/// `body` runs once the held POST, the first copy and its waiting copy are all
/// in flight; it gets the held POST, the hedged GET and when the GET was sent.
private func withWaitingCopy(
    busy: UpstreamTestBackend,
    other: UpstreamTestBackend,
    path: String = "/delayed",
    afterMilliseconds: Int64 = 100,
    _ configure: @escaping (inout ServerConfiguration) -> Void = { _ in },
    _ body: (
        _ server: TestServer, _ pool: UpstreamPool, _ held: Task<HTTPResult, any Error>,
        _ hedged: Task<HTTPResult, any Error>, _ sent: ContinuousClock.Instant
    ) async throws -> Void
) async throws {
    try await withProxy([busy.port, other.port], {
        $0.connectionsPerUpstream = 1
        $0.upstreamHedgeAfterMilliseconds = afterMilliseconds
        configure(&$0)
    }) { server, pool in
        let held = Task { try await request(server.url("/pause"), method: "POST", body: "{}") }
        #expect(try await eventually { busy.requestsReceived == 1 })
        let sent = ContinuousClock.now
        let hedged = Task { try await request(server.url(path)) }
        #expect(try await eventually { await pool.balancer.stats().inFlight == 3 })
        try await body(server, pool, held, hedged, sent)
    }
}

@Suite("hedged upstream requests: copies on other backends, the first response wins")
struct HedgingTests {
    @Test("after the delay a copy goes to the other backend and wins; the slow one is cancelled and sees the disconnect")
    func timedCopyWins() async throws {
        let slow = try await UpstreamTestBackend.start(responseDelay: .seconds(10))
        let fast = try await UpstreamTestBackend.start()
        defer { Task { await slow.stop(); await fast.stop() } }
        // 1 s: time for the first copy to reach the slow backend first, even when the
        // tests beside it keep the machine's few threads busy.
        try await withProxy([slow.port, fast.port], { $0.upstreamHedgeAfterMilliseconds = 1_000 }) { server, _ in
            // The first request goes to worker 0, the slow backend's.
            let answer = try await request(server.url("/delayed"))
            #expect(answer.status == 200)
            #expect(answer.text == "port \(fast.port)", "the copy on the fast backend answered")

            let figures = try await settled(server)
            #expect(figures.pending.allSatisfy { $0 == 0 }, "\(figures)")
            #expect(figures.hedged == 1 && figures.copies == 1 && figures.losers == 1, "\(figures)")
            #expect(figures.skipped == 0 && figures.overBudget == 0, "\(figures)")
            #expect(figures.wins == [0, 1], "the second copy won: \(figures)")
            #expect(figures.retries == [0, 0])
            #expect(
                try await eventually(timeout: .seconds(20)) { slow.disconnectsWhileDelayed == 1 },
                "the loser's connection was closed")
            #expect(slow.requestsReceived == 1 && fast.requestsReceived == 1, "one request each, no retry")
        }
    }

    @Test("with loser_finish_ms the loser finishes, its response thrown away, and keeps its connection; the client does not wait for it")
    func loserFinishesAndKeepsItsConnection() async throws {
        let slow = try await UpstreamTestBackend.start(responseDelay: .seconds(3))
        let fast = try await UpstreamTestBackend.start()
        defer { Task { await slow.stop(); await fast.stop() } }
        try await withProxy([slow.port, fast.port], {
            $0.connectionsPerUpstream = 1
            $0.upstreamHedgeAfterMilliseconds = 300
            $0.upstreamHedgeLoserFinishMilliseconds = 20_000
        }) { server, _ in
            // The first request goes to worker 0, the slow backend's. On one
            // keep-alive connection: its next request is answered while the
            // loser still runs (the server does not wait for it).
            try await withRawConnection(port: server.port) { client in
                try await client.send("GET /delayed HTTP/1.1\r\nHost: x\r\n\r\n")
                let answer = try #require(try await client.readResponse())
                #expect(answer.status == 200)
                #expect(answer.body == "port \(fast.port)", "the copy on the fast backend answered")
                try await client.send("GET /?code=204 HTTP/1.1\r\nHost: x\r\n\r\n")
                let next = try #require(try await client.readResponse())
                #expect(next.status == 204)
            }
            let early = try await HedgeFigures.read(server)
            #expect(early.pending.reduce(0, +) == 1, "answered while the loser still runs: \(early)")
            #expect(early.losersFinished == 0, "\(early)")

            let figures = try await settled(server)
            #expect(figures.hedged == 1 && figures.copies == 1 && figures.losers == 1, "\(figures)")
            #expect(figures.wins == [0, 1], "\(figures)")
            #expect(figures.losersFinished == 1, "the loser finished: \(figures)")
            #expect(slow.disconnectsWhileDelayed == 0, "the loser's connection was not closed")
            #expect(slow.connectionsAccepted == 1 && slow.openConnections == 1, "and it is kept")
            #expect(slow.requestsReceived + fast.requestsReceived == 3, "no copy of the second request")

            // The next request goes to the least recently used worker, the slow
            // backend's, over the kept connection.
            let reused = try await request(server.url("/?code=200"))
            #expect(reused.status == 200)
            #expect(slow.requestsReceived == 2 && slow.connectionsAccepted == 1, "sent on the loser's connection")
        }
    }

    @Test("a client that goes away mid-body stops the copy that won at once, whether or not losers may finish", arguments: [0, 60_000] as [Int64])
    func clientGoneStopsTheWinner(loserFinishMilliseconds: Int64) async throws {
        let backend = try await UpstreamTestBackend.start()
        let other = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop(); await other.stop() } }
        try await withProxy([backend.port, other.port], {
            $0.connectionsPerUpstream = 1
            $0.upstreamHedgeAfterMilliseconds = 10_000
            $0.upstreamHedgeLoserFinishMilliseconds = loserFinishMilliseconds
        }) { server, _ in
            // /pause sends its head and "first;", then waits (10 s at most) for
            // more to send: the client leaves in between.
            try await withRawConnection(port: server.port) { client in
                try await client.send("GET /pause HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try await client.read(through: "first;") != nil)
            }
            #expect(
                try await eventually(timeout: .seconds(5)) { backend.openConnections == 0 },
                "the winner's upstream connection closed with the client's")
            let figures = try await settled(server)
            #expect(figures.pending.allSatisfy { $0 == 0 } && figures.copies == 0, "\(figures)")
        }
    }

    @Test("a finishing loser is closed when loser_finish_ms passes first, or when its body passes 64 KiB; one its backend closes is not kept")
    func finishingLoserIsClosedAtItsLimits() async throws {
        // No head within loser_finish_ms: closed then, not at the win.
        let stuck = try await UpstreamTestBackend.start(responseDelay: .seconds(30))
        let fast = try await UpstreamTestBackend.start()
        defer { Task { await stuck.stop(); await fast.stop() } }
        try await withProxy([stuck.port, fast.port], {
            $0.upstreamHedgeAfterMilliseconds = 300
            $0.upstreamHedgeLoserFinishMilliseconds = 2_000
        }) { server, _ in
            let answer = try await request(server.url("/delayed"))
            #expect(answer.text == "port \(fast.port)")
            #expect(stuck.disconnectsWhileDelayed == 0, "still given its time")
            #expect(
                try await eventually(timeout: .seconds(20)) { stuck.disconnectsWhileDelayed == 1 },
                "closed at the deadline")
            let figures = try await settled(server)
            #expect(figures.losers == 1 && figures.losersFinished == 0, "\(figures)")
        }

        // A head in time, but a body past 64 KiB: closed as it comes.
        // (2 s: the copy, due after 300 ms, must win even on a loaded machine.)
        let large = try await UpstreamTestBackend.start(responseDelay: .seconds(2))
        defer { Task { await large.stop() } }
        try await withProxy([large.port, fast.port], {
            $0.upstreamHedgeAfterMilliseconds = 300
            $0.upstreamHedgeLoserFinishMilliseconds = 20_000
        }) { server, _ in
            let answer = try await request(server.url("/delayed?n=200000"))
            #expect(answer.status == 200)
            #expect(answer.body.count == 200_000, "the winner's whole body")
            let figures = try await settled(server)
            #expect(figures.losers == 1 && figures.losersFinished == 0, "\(figures)")
            #expect(try await eventually(timeout: .seconds(20)) { large.openConnections == 0 }, "the loser's connection closed")
            #expect(large.disconnectsWhileDelayed == 0, "after its head, not before")
        }

        // It finishes in time, but its backend closes the connection: not kept, not counted.
        let closing = try await UpstreamTestBackend.start(responseDelay: .seconds(2))
        defer { Task { await closing.stop() } }
        try await withProxy([closing.port, fast.port], {
            $0.upstreamHedgeAfterMilliseconds = 300
            $0.upstreamHedgeLoserFinishMilliseconds = 20_000
        }) { server, _ in
            let answer = try await request(server.url("/delayed?close=1"))
            #expect(answer.header("x-backend-port") == String(fast.port))
            let figures = try await settled(server)
            #expect(figures.losers == 1 && figures.losersFinished == 0, "\(figures)")
            #expect(closing.requestsReceived == 1 && closing.disconnectsWhileDelayed == 0, "it answered")
            #expect(try await eventually(timeout: .seconds(20)) { closing.openConnections == 0 })
        }
    }

    @Test("a hedged request in flight when the server begins to drain is answered once, by its own copy; no copy starts then")
    func hedgedRequestDuringShutdown() async throws {
        let slow = try await UpstreamTestBackend.start(responseDelay: .seconds(3))
        let fast = try await UpstreamTestBackend.start()
        defer { Task { await slow.stop(); await fast.stop() } }
        try await withProxy([slow.port, fast.port], {
            $0.connectionsPerUpstream = 1
            $0.upstreamHedgeAfterMilliseconds = 2_000
        }) { server, _ in
            try await withRawConnection(port: server.port) { client in
                // The first request goes to worker 0, the slow backend's; its copy
                // would be due after 2 s, but the drain has begun by then.
                try await client.send("GET /delayed HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try await eventually { slow.requestsReceived == 1 })
                await server.group.triggerGracefulShutdown()
                let response = try #require(try await client.readResponse())
                #expect(response.status == 200)
                #expect(response.body == "port \(slow.port)", "answered by the copy that was running")
                #expect(response.headers["connection"] == "close")
                #expect(try await client.readUntilClosed(), "and only once")
            }
            #expect(fast.requestsReceived == 0, "no copy started during the drain")
            #expect(slow.disconnectsWhileDelayed == 0)
        }
    }

    @Test("no timed copy for a request its backend can be expected to answer within another delay")
    func copyDeclinedWhenTheBackendAnswersSoon() async throws {
        // Both backends always answer in 1 s; copies are due after 700 ms. Once
        // both have answered, a request that has waited 700 ms has about 300 ms
        // left: a copy could not answer sooner than that, so none is sent.
        let first = try await UpstreamTestBackend.start(responseDelay: .seconds(1))
        let second = try await UpstreamTestBackend.start(responseDelay: .seconds(1))
        defer { Task { await first.stop(); await second.stop() } }
        try await withProxy([first.port, second.port], { $0.upstreamHedgeAfterMilliseconds = 700 }) { server, _ in
            // Until a backend has answered, nothing is known of it: copies may go. Two
            // requests at once go to both backends (the second to the idle one), and
            // each answers its own before the other's copy can.
            async let one = request(server.url("/delayed"))
            async let two = request(server.url("/delayed"))
            let answers = try await [one, two]
            #expect(Set(answers.map(\.text)) == ["port \(first.port)", "port \(second.port)"])
            let known = try await settled(server)
            for _ in 0..<3 { #expect(try await request(server.url("/delayed")).status == 200) }
            let figures = try await settled(server)
            #expect(figures.copies == known.copies, "no copy once the wait is known: \(known) then \(figures)")
            #expect(figures.declined >= known.declined + 3, "\(known) then \(figures)")
            #expect(figures.pending.allSatisfy { $0 == 0 } && figures.overBudget == 0, "\(figures)")
        }
    }

    @Test("response times: the expected further wait of a request by how long it has waited, following the backend")
    func responseTimesExpectedWait() throws {
        let times = ResponseTimes()
        #expect(times.expectedWait(after: .zero) == nil, "nothing recorded, nothing known")
        for _ in 0..<100 {
            times.record(.milliseconds(2))
            times.record(.milliseconds(100))
        }
        // Within the buckets' precision (a quarter octave): the mean is about 51 ms.
        let mean = try #require(times.expectedWait(after: .zero))
        #expect(mean > .milliseconds(43) && mean < .milliseconds(60), "\(mean)")
        // Having waited 10 ms, only the 100 ms requests are left: about 90 ms more.
        let rest = try #require(times.expectedWait(after: .milliseconds(10)))
        #expect(rest > .milliseconds(80) && rest < .milliseconds(110), "\(rest)")
        #expect(times.expectedWait(after: .milliseconds(200)) == nil, "past every recorded time")
        // Requests stopped at 20 ms (hedges' losers) say only that they took longer:
        // the tail is still the 100 ms answers (Kaplan-Meier), not cut at 20 ms.
        for _ in 0..<100 { times.recordStopped(after: .milliseconds(20)) }
        let censored = try #require(times.expectedWait(after: .milliseconds(10)))
        #expect(censored > .milliseconds(80) && censored < .milliseconds(110), "\(censored)")
        // A stop returns the rest its request could be expected to have taken.
        let stopped = try #require(times.recordStopped(after: .milliseconds(50)))
        #expect(stopped > .milliseconds(40) && stopped < .milliseconds(70), "\(stopped)")
        #expect(times.recordStopped(after: .seconds(1)) == nil, "nothing known past 1 s")
        // A backend whose slow requests are all cut short: its tail is unknown, not short.
        let cut = ResponseTimes()
        for _ in 0..<40 { cut.record(.milliseconds(2)) }
        for _ in 0..<60 { cut.recordStopped(after: .milliseconds(12)) }
        #expect(cut.expectedWait(after: .milliseconds(10)) == nil, "only stops past 10 ms")
        #expect(cut.expectedWait(after: .zero) == nil, "mostly unknown: not taken for a fast backend")
        // An exponential backend (mean 20 ms) whose requests are cut at 12 ms:
        // heads come until the cut at the rate that goes on past it, so the
        // rest is extrapolated at that rate, about the mean again, not 0.
        let exponential = ResponseTimes()
        for quantile in stride(from: 0.0025, to: 1, by: 0.005) {
            let time = -20.0 * log(1 - quantile)
            if time < 12 {
                exponential.record(.microseconds(Int64(time * 1000)))
            } else {
                exponential.recordStopped(after: .milliseconds(12))
            }
        }
        let beyond = try #require(exponential.expectedWait(after: .milliseconds(10)))
        #expect(beyond > .milliseconds(15) && beyond < .milliseconds(28), "\(beyond)")
        let whole = try #require(exponential.expectedWait(after: .zero))
        #expect(whole > .milliseconds(15) && whole < .milliseconds(28), "\(whole)")
        #expect(exponential.expectedWait(after: .milliseconds(15)) == nil, "past every record")
        // A fast mode, a trickle of heads after it, and a stuck mode cut at 12 ms:
        // the rate had fallen, so it says nothing of the stuck requests.
        let stuck = ResponseTimes()
        for _ in 0..<100 { stuck.record(.milliseconds(3)) }
        for _ in 0..<8 { stuck.record(.milliseconds(7)) }
        for _ in 0..<100 { stuck.recordStopped(after: .milliseconds(12)) }
        #expect(stuck.expectedWait(after: .milliseconds(5)) == nil, "only stops past 5 ms, and no rate to go on")
        // Old times fade: after many fast answers the slow ones are forgotten.
        for _ in 0..<(8 * ResponseTimes.window) { times.record(.milliseconds(2)) }
        #expect(times.expectedWait(after: .milliseconds(10)) == nil)
        let fast = try #require(times.expectedWait(after: .zero))
        #expect(fast < .milliseconds(3), "\(fast)")
    }

    @Test("a copy still waiting for a worker does not hold up the answer when the first copy fails")
    func waitingCopyDoesNotHoldUpTheAnswer() async throws {
        let busy = try await UpstreamTestBackend.start()
        let failing = try await UpstreamTestBackend.start()
        defer { Task { await busy.stop(); await failing.stop() } }
        try await withWaitingCopy(busy: busy, other: failing, path: "/reset?after_ms=1000", afterMilliseconds: 50, {
            $0.upstreamRetries = 0
            $0.upstreamResponseTimeoutMilliseconds = 10_000
        }) { server, pool, held, failed, start in
            let answer = try await failed.value
            let elapsed = ContinuousClock.now - start
            #expect(answer.status == 502, "\(answer.text)")
            #expect(elapsed < .seconds(5), "answered after \(elapsed), not after the copy's patience (10 s)")
            let figures = try await HedgeFigures.read(server)
            #expect(figures.copies == 0 && figures.skipped == 0, "the copy was withdrawn, not refused: \(figures)")
            // (The failed copy's worker counts it until the balancer takes its end.)
            #expect(try await eventually { await pool.balancer.stats().inFlight == 1 }, "only the held POST is left")

            busy.releasePauses()
            #expect(try await held.value.status == 200)
            let settled = try await settled(server)
            #expect(settled.pending.allSatisfy { $0 == 0 }, "\(settled)")
            #expect(busy.requestsReceived == 1 && failing.requestsReceived == 1, "the copy never reached a backend")
        }
    }

    @Test("a copy waits for a worker on another backend, runs when one frees up, and wins")
    func waitingCopyRunsAndWins() async throws {
        let fast = try await UpstreamTestBackend.start()
        let slow = try await UpstreamTestBackend.start(responseDelay: .seconds(10))
        defer { Task { await fast.stop(); await slow.stop() } }
        // A POST holds the fast backend's only worker; the first copy is on the slow one.
        try await withWaitingCopy(busy: fast, other: slow) { server, _, held, hedged, _ in
            #expect(fast.requestsReceived == 1, "the copy waits: it is not sent anywhere else")
            #expect(try await HedgeFigures.read(server).waiting == 1, "/stats shows the waiting copy")
            fast.releasePauses()
            let answer = try await hedged.value
            #expect(answer.text == "port \(fast.port)", "the copy took the freed worker and won")
            #expect(try await held.value.status == 200)
            let figures = try await settled(server)
            #expect(figures.pending.allSatisfy { $0 == 0 }, "\(figures)")
            #expect(figures.copies == 1 && figures.wins == [0, 1] && figures.losers == 1, "\(figures)")
            #expect(figures.skipped == 0 && figures.waiting == 0, "\(figures)")
            #expect(try await eventually { slow.disconnectsWhileDelayed == 1 }, "the slow copy was cancelled")
        }
    }

    @Test("a copy still waiting for a worker is withdrawn when the first copy answers")
    func waitingCopyWithdrawnAtTheWin() async throws {
        let busy = try await UpstreamTestBackend.start()
        let slow = try await UpstreamTestBackend.start(responseDelay: .seconds(1))
        defer { Task { await busy.stop(); await slow.stop() } }
        try await withWaitingCopy(busy: busy, other: slow) { server, pool, held, hedged, _ in
            let answer = try await hedged.value
            #expect(answer.text == "port \(slow.port)")
            #expect(try await eventually { await pool.balancer.stats().inFlight == 1 }, "only the held POST is left")
            let figures = try await HedgeFigures.read(server)
            #expect(figures.hedged == 0 && figures.copies == 0 && figures.skipped == 0, "\(figures)")
            #expect(figures.waiting == 0, "withdrawn: \(figures)")

            busy.releasePauses()
            #expect(try await held.value.status == 200)
            let settled = try await settled(server)
            #expect(settled.pending.allSatisfy { $0 == 0 }, "\(settled)")
            #expect(busy.requestsReceived == 1, "the withdrawn copy never ran")
        }
    }

    @Test("draining the backend a copy waits for ends the copy, counted skipped; the first copy still answers")
    func drainEndsWaitingCopy() async throws {
        let busy = try await UpstreamTestBackend.start()
        let slow = try await UpstreamTestBackend.start(responseDelay: .milliseconds(1_500))
        defer { Task { await busy.stop(); await slow.stop() } }
        try await withWaitingCopy(busy: busy, other: slow) { server, pool, held, hedged, _ in
            try await pool.drain("backend1")
            #expect(try await eventually { try await HedgeFigures.read(server).skipped >= 1 })
            let answer = try await hedged.value
            #expect(answer.text == "port \(slow.port)")

            busy.releasePauses()
            #expect(try await held.value.status == 200)
            let figures = try await settled(server)
            #expect(figures.pending.allSatisfy { $0 == 0 }, "\(figures)")
            #expect(figures.copies == 0 && figures.losers == 0, "\(figures)")
            #expect(figures.skipped == 1, "no copy is tried again for a backend out of rotation: \(figures)")
            #expect(busy.requestsReceived == 1, "the drained backend got no copy")
        }
    }

    @Test("a copy that fails fast does not win while another copy may still answer")
    func fastFailureDoesNotWin() async throws {
        // A backend that answers garbage at once (a closed port could be taken by
        // another test's server meanwhile).
        let broken = try await UpstreamTestBackend.start(mode: .garbage)
        let live = try await UpstreamTestBackend.start(responseDelay: .milliseconds(300))
        defer { Task { await broken.stop(); await live.stop() } }
        try await withProxy([broken.port, live.port]) { server, _ in
            // Two copies at once: the first on the broken backend (fails at once), the second on the live one.
            let answer = try await request(server.url("/delayed"), headers: ["X-Balancer-Replicas": "2"])
            #expect(answer.status == 200, "\(answer.text)")
            #expect(answer.text == "port \(live.port)")
            let figures = try await settled(server)
            #expect(figures.hedged == 1 && figures.copies == 1 && figures.losers == 0, "\(figures)")
            #expect(figures.wins == [0, 1], "\(figures)")
            #expect(figures.retries == [0, 0], "the live copy answered; no retry was needed: \(figures)")
            #expect(live.requestsReceived == 1)
        }
    }

    @Test("X-Balancer-Replicas: N copies at once on distinct backends, capped by upstream_max_replicas, and not forwarded")
    func replicasHeader() async throws {
        let slowest = try await UpstreamTestBackend.start(responseDelay: .seconds(10))
        // 1 s: time for the first copy to reach the slowest backend before this one
        // answers, even when the tests beside it keep the machine's threads busy.
        let slow = try await UpstreamTestBackend.start(responseDelay: .seconds(1))
        let idle = try await UpstreamTestBackend.start()
        defer { Task { await slowest.stop(); await slow.stop(); await idle.stop() } }
        try await withProxy([slowest.port, slow.port, idle.port]) { server, _ in
            // 5 asked, capped at the default 2: the third backend never sees the request.
            let answer = try await request(server.url("/delayed"), headers: ["X-Balancer-Replicas": "5"])
            #expect(answer.status == 200)
            #expect(answer.text == "port \(slow.port)")
            let figures = try await settled(server)
            #expect(figures.hedged == 1 && figures.copies == 1 && figures.losers == 1, "\(figures)")
            #expect(figures.wins == [0, 1], "\(figures)")
            #expect(try await eventually(timeout: .seconds(20)) { slowest.disconnectsWhileDelayed == 1 })
            #expect(idle.requestsReceived == 0, "capped at 2 copies")
            #expect(slowest.requestsWithBalancerHeaders + slow.requestsWithBalancerHeaders == 0, "the header is the balancer's")

            // Bad values are refused before anything is sent.
            for value in ["two", "0", "-1"] {
                let refused = try await request(server.url("/delayed"), headers: ["X-Balancer-Replicas": value])
                #expect(refused.status == 400)
                #expect(refused.errorCode == "bad_request")
            }
            #expect(slowest.requestsReceived + slow.requestsReceived + idle.requestsReceived == 2)
        }
        // upstream_max_replicas 1 forbids asking for more than one copy.
        let backend = try await UpstreamTestBackend.start()
        defer { Task { await backend.stop() } }
        try await withProxy([backend.port], { $0.upstreamMaxReplicas = 1 }) { server, _ in
            let forbidden = try await request(server.url("/echo"), headers: ["X-Balancer-Replicas": "2"])
            #expect(forbidden.status == 400)
            #expect(forbidden.errorCode == "replicas_forbidden")
            let one = try await request(server.url("/echo"), headers: ["X-Balancer-Replicas": "1"])
            #expect(one.status == 200)
            #expect(backend.requestsReceived == 1)
        }
    }

    @Test("a pool of one backend sends no copy: nothing waits for a backend that is not there")
    func oneBackendNoCopy() async throws {
        let only = try await UpstreamTestBackend.start(responseDelay: .seconds(1))
        defer { Task { await only.stop() } }
        try await withProxy([only.port], { $0.upstreamHedgeAfterMilliseconds = 20 }) { server, pool in
            // Answered after 1 s, past the delay many times over.
            let answer = try await request(server.url("/delayed"))
            #expect(answer.status == 200)
            #expect(answer.text == "port \(only.port)")
            // No copy was ever submitted to wait for a worker no other backend has.
            #expect(await pool.balancer.stats().submitted == 1)
            let figures = try await settled(server)
            #expect(figures.hedged == 0 && figures.copies == 0 && figures.skipped == 0 && figures.overBudget == 0, "\(figures)")
            #expect(only.requestsReceived == 1)
            let stats = try await request(server.url("/stats"))
            let pool = try #require((try stats.json["pools"] as? [[String: any Sendable]])?.first)
            let queue = try #require(pool["queue"] as? [String: any Sendable])
            #expect(queue["depth"] as? Int == 0)
        }
    }

    @Test("POST (and a PUT with a streamed body) is never copied, by delay or by header")
    func nonIdempotentNeverCopied() async throws {
        let slow = try await UpstreamTestBackend.start(responseDelay: .milliseconds(300))
        let fast = try await UpstreamTestBackend.start()
        defer { Task { await slow.stop(); await fast.stop() } }
        try await withProxy([slow.port, fast.port], { $0.upstreamHedgeAfterMilliseconds = 20 }) { server, _ in
            let posted = try await request(
                server.url("/delayed"), method: "POST", body: "{}", headers: ["X-Balancer-Replicas": "2"])
            #expect(posted.status == 200)
            #expect(posted.text == "port \(slow.port)", "the only copy, on the first worker's backend")
            #expect(slow.requestsReceived == 1 && fast.requestsReceived == 0, "the backends saw one request")

            // A PUT whose body is streamed cannot be sent twice.
            let put = try await request(server.url("/delayed"), method: "PUT", body: "{}")
            #expect(put.status == 200)
            #expect(slow.requestsReceived + fast.requestsReceived == 2)
            let figures = try await settled(server)
            #expect(figures.hedged == 0 && figures.copies == 0 && figures.losers == 0, "\(figures)")
            #expect(figures.wins.allSatisfy { $0 == 0 })
        }
    }

    @Test("a client that goes away cancels every copy: both backends see the disconnect, pending returns to 0")
    func clientGoneCancelsEveryCopy() async throws {
        let first = try await UpstreamTestBackend.start(responseDelay: .seconds(10))
        let second = try await UpstreamTestBackend.start(responseDelay: .seconds(10))
        defer { Task { await first.stop(); await second.stop() } }
        try await withProxy([first.port, second.port], { $0.upstreamHedgeAfterMilliseconds = 50 }) { server, _ in
            // The client leaves once both copies have reached their backends.
            try await withRawConnection(port: server.port) { connection in
                try await connection.send("GET /delayed HTTP/1.1\r\nHost: test\r\n\r\n")
                #expect(
                    try await eventually(timeout: .seconds(20)) {
                        first.requestsReceived == 1 && second.requestsReceived == 1
                    })
            }
            #expect(
                try await eventually(timeout: .seconds(20)) {
                    first.disconnectsWhileDelayed == 1 && second.disconnectsWhileDelayed == 1
                })
            let figures = try await settled(server)
            #expect(figures.pending.allSatisfy { $0 == 0 }, "\(figures)")
            #expect(figures.hedged == 1 && figures.copies == 1 && figures.losers == 0, "nobody won: \(figures)")
            #expect(figures.wins == [0, 0])
        }
    }

    @Test("a pool's hedge object: its fields, the top-level settings for pools without one, and errors naming the field")
    func poolHedgeConfiguration() throws {
        let text = """
            {"pools": [
              {"name": "jobs", "kind": "jobs"},
              {"name": "api", "route": "/api/", "backends": [{"url": "http://127.0.0.1:9001"}],
               "hedge": {"after_ms": 30, "max": 3, "budget_percent": 5}},
              {"name": "web", "backends": [{"url": "http://127.0.0.1:9002"}]}
            ]}
            """
        let configuration = try ServerConfiguration.load(
            environment: ["BALANCER_UPSTREAM_HEDGE_AFTER_MS": "7", "BALANCER_UPSTREAM_MAX_REPLICAS": "4"],
            file: ("pools.json", ByteBuffer(string: text)))
        let pools = configuration.effectivePools
        #expect(pools[1].hedging == HedgePolicy(after: .milliseconds(30), maxCopies: 3, maxReplicas: 2, budgetPercent: 5))
        #expect(pools[2].hedging == HedgePolicy(after: .milliseconds(7), maxCopies: 2, maxReplicas: 4, budgetPercent: 10))
        // --print-config gives the hedge object back, and it loads to the same pools.
        let printed = try ServerConfiguration.load(file: ("printed.json", ByteBuffer(string: configuration.prettyJSON)))
        #expect(printed.pools == configuration.pools)

        let refused: [(String, String)] = [
            (#"{"after": 30}"#, #"pools[1].hedge: unknown key "after""#),
            (#"{"max": 0}"#, "pools[1].hedge.max: 0 is out of range 1...16"),
            (#"{"after_ms": -1}"#, "pools[1].hedge.after_ms: -1 is out of range 0...3600000"),
            (#"[30]"#, "pools[1].hedge: must be an object"),
        ]
        for (hedge, message) in refused {
            let bad = """
                {"pools": [{"name": "jobs", "kind": "jobs"},
                  {"name": "api", "backends": [{"url": "http://127.0.0.1:9001"}], "hedge": \(hedge)}]}
                """
            #expect {
                _ = try ServerConfiguration.load(file: ("pools.json", ByteBuffer(string: bad)))
            } throws: { error in
                "\(error)".contains(message)
            }
        }
        #expect(throws: ConfigurationError.self) {
            _ = try ServerConfiguration.load(
                file: ("pools.json", ByteBuffer(string: #"{"pools": [{"name": "jobs", "kind": "jobs", "hedge": {"max": 2}}]}"#)))
        }
    }

    @Test("a route with a hedge object is hedged; a route without one is not")
    func hedgePerRoute() async throws {
        let apiSlow = try await UpstreamTestBackend.start(responseDelay: .seconds(10))
        let apiFast = try await UpstreamTestBackend.start()
        let webSlow = try await UpstreamTestBackend.start(responseDelay: .milliseconds(300))
        let webFast = try await UpstreamTestBackend.start()
        defer { Task { await apiSlow.stop(); await apiFast.stop(); await webSlow.stop(); await webFast.stop() } }
        let loaded = try ServerConfiguration.load(
            file: ("pools.json", ByteBuffer(string: """
                {"pools": [
                  {"name": "jobs", "kind": "jobs"},
                  {"name": "api", "route": "/delayed/api", "hedge": {"after_ms": 50},
                   "backends": [{"url": "http://127.0.0.1:\(apiSlow.port)", "connections": 2},
                                {"url": "http://127.0.0.1:\(apiFast.port)", "connections": 2}]},
                  {"name": "web",
                   "backends": [{"url": "http://127.0.0.1:\(webSlow.port)", "connections": 2},
                                {"url": "http://127.0.0.1:\(webFast.port)", "connections": 2}]}
                ]}
                """)))
        try await withServer({ $0 = loaded; $0.port = 0 }) { server in
            let hedged = try await request(server.url("/delayed/api"))
            #expect(hedged.text == "port \(apiFast.port)", "the copy on the fast backend answered")
            let plain = try await request(server.url("/delayed"))
            #expect(plain.text == "port \(webSlow.port)", "no copy: the first worker's backend answered, late")
            #expect(webFast.requestsReceived == 0)
            let stats = try await request(server.url("/stats"))
            let pools = try #require(try stats.json["pools"] as? [[String: any Sendable]])
            let hedging = pools.map { ($0["hedging"] as? [String: any Sendable])?["hedged_requests"] as? Int }
            #expect(hedging == [1, 0])
        }
    }

    @Test("the budget allows a burst of copies, then percent copies per 100 requests, and takes back unused ones")
    func budget() {
        let budget = HedgeBudget(percent: 10)
        for _ in 0..<HedgeBudget.burst { #expect(budget.withdraw()) }
        #expect(!budget.withdraw(), "the burst is spent")
        for _ in 0..<9 { budget.deposit() }
        #expect(!budget.withdraw(), "9 requests at 10% are 0.9 copies")
        budget.deposit()
        #expect(budget.withdraw(), "10 requests at 10% are one copy")
        #expect(!budget.withdraw())
        budget.refund()
        #expect(budget.withdraw(), "a copy that found no room is given back")
        for _ in 0..<1_000 { budget.deposit() }
        budget.refund()
        for _ in 0..<HedgeBudget.burst { #expect(budget.withdraw()) }
        #expect(!budget.withdraw(), "deposits and refunds stop at the burst")
    }

    @Test("the quantile estimate settles at the percentile of its samples and follows a change")
    func quantileEstimate() throws {
        var random = SplitMix64(seed: 7)
        /// An exponential sample with mean `mean` ms.
        func sample(mean: Double) -> Duration {
            let uniform = Double(random.next() >> 11) / Double(1 << 53)
            return .nanoseconds(Int64(-log(1 - uniform) * mean * 1e6))
        }
        let estimate = QuantileEstimate(quantile: 0.95)
        #expect(estimate.estimate == nil, "no sample yet")
        for _ in 0..<20_000 { estimate.record(sample(mean: 10)) }
        // The 95th percentile of an exponential distribution is mean × ln 20.
        let p95: Double = log(20)
        let settled: Double = try #require(estimate.estimate).seconds * 1e3
        #expect(abs(settled - 10 * p95) < 10 * p95 * 0.15, "estimate \(settled) ms")
        for _ in 0..<5_000 { estimate.record(sample(mean: 100)) }
        let risen: Double = try #require(estimate.estimate).seconds * 1e3
        #expect(abs(risen - 100 * p95) < 100 * p95 * 0.15, "estimate \(risen) ms")
    }

    @Test("after_percentile: the delay follows the pool's response times, at least after_ms; the settings load")
    func percentileDelay() async throws {
        let policy = HedgePolicy(after: nil, maxCopies: 2, maxReplicas: 2, afterPercentile: 95)
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")
        #expect(policy.plan(for: &head, replayable: true) == .hedged(atOnce: 1, timed: true, maxCopies: 2))
        #expect(policy.delay(estimate: nil) == nil, "no timed copy before the pool has answered")
        #expect(policy.delay(estimate: .milliseconds(30)) == .milliseconds(30))
        var floored = policy
        floored.after = .milliseconds(50)
        #expect(floored.delay(estimate: nil) == .milliseconds(50))
        #expect(floored.delay(estimate: .milliseconds(30)) == .milliseconds(50), "never below after_ms")
        #expect(floored.delay(estimate: .milliseconds(80)) == .milliseconds(80))

        let loaded = try ServerConfiguration.load(
            environment: ["BALANCER_UPSTREAM_HEDGE_AFTER_PERCENTILE": "95"],
            file: ("pools.json", ByteBuffer(string: """
                {"pools": [{"name": "jobs", "kind": "jobs"},
                  {"name": "api", "route": "/api/", "backends": [{"url": "http://127.0.0.1:9001"}], "hedge": {"after_percentile": 99}},
                  {"name": "web", "backends": [{"url": "http://127.0.0.1:9002"}]}]}
                """)))
        #expect(loaded.upstreamHedgeAfterPercentile == 95)
        #expect(loaded.effectivePools.compactMap(\.hedging?.afterPercentile) == [99, 95])
        #expect {
            _ = try ServerConfiguration.load(environment: ["BALANCER_UPSTREAM_HEDGE_AFTER_PERCENTILE": "100"])
        } throws: { error in
            "\(error)".contains("100 is out of range 0...99")
        }

        // Two backends answering in 40 ms: the delay (p50) settles near 40 ms.
        let first = try await UpstreamTestBackend.start(responseDelay: .milliseconds(40))
        let second = try await UpstreamTestBackend.start(responseDelay: .milliseconds(40))
        defer { Task { await first.stop(); await second.stop() } }
        try await withProxy([first.port, second.port], { $0.upstreamHedgeAfterPercentile = 50 }) { server, _ in
            #expect(try await hedgeDelay(server) == nil, "no estimate yet, no after_ms: no timed copies")
            for _ in 0..<20 {
                let answer = try await request(server.url("/delayed"))
                #expect(answer.status == 200)
            }
            let delay = try #require(try await hedgeDelay(server))
            // At least the backends' time; far below anything else in play (the response
            // timeout is 30 s), with room for a slow first answer on a busy machine.
            #expect(delay >= 35_000 && delay <= 1_000_000, "delay \(delay) µs")
            let figures = try await settled(server)
            #expect(figures.pending.allSatisfy { $0 == 0 }, "\(figures)")
        }
    }

    @Test("loser_finish_ms loads from the top-level key and a pool's hedge object; 0 closes losers at once")
    func loserFinishSettingsLoad() throws {
        let loaded = try ServerConfiguration.load(
            environment: ["BALANCER_UPSTREAM_HEDGE_LOSER_FINISH_MS": "500"],
            file: ("pools.json", ByteBuffer(string: """
                {"pools": [{"name": "jobs", "kind": "jobs"},
                  {"name": "api", "route": "/api/", "backends": [{"url": "http://127.0.0.1:9001"}], "hedge": {"loser_finish_ms": 0}},
                  {"name": "web", "backends": [{"url": "http://127.0.0.1:9002"}]}]}
                """)))
        #expect(loaded.upstreamHedgeLoserFinishMilliseconds == 500)
        #expect(loaded.effectivePools.compactMap(\.hedging).map(\.loserFinish) == [nil, .milliseconds(500)])
        #expect(ServerConfiguration().upstreamHedging.loserFinish == nil, "closed at once by default")
        #expect {
            _ = try ServerConfiguration.load(environment: ["BALANCER_UPSTREAM_HEDGE_LOSER_FINISH_MS": "-1"])
        } throws: { error in
            "\(error)".contains("out of range")
        }
    }

    @Test("after_percentile samples each request once, from its start to the head that reaches the client")
    func percentileSamplesTimeToHead() async throws {
        let slow = try await UpstreamTestBackend.start(responseDelay: .seconds(10))
        let fast = try await UpstreamTestBackend.start()
        defer { Task { await slow.stop(); await fast.stop() } }
        try await withProxy([slow.port, fast.port], {
            $0.upstreamHedgeAfterMilliseconds = 300
            $0.upstreamHedgeAfterPercentile = 50
        }) { server, pool in
            let estimate = try #require(pool.hedgeLatency)
            // The first copy waits on the slow backend; the copy sent after 300 ms wins
            // at once. The sample is the request's 300 ms and more, not the winning
            // copy's own few milliseconds (nor the cancelled loser's).
            let answer = try await request(server.url("/delayed"))
            #expect(answer.text == "port \(fast.port)")
            let hedged = try #require(estimate.estimate)
            #expect(hedged >= .milliseconds(300), "sample \(hedged)")
            #expect(try await settled(server).wins == [0, 1])

            // A head at once and a body held until released: the sample is taken at the head.
            let paused = try await withThrowingTaskGroup(of: HTTPResult.self) { group in
                group.addTask { try await request(server.url("/pause"), method: "POST", body: "{}") }
                #expect(try await eventually { estimate.estimate != hedged }, "sampled while the body is held")
                slow.releasePauses()
                fast.releasePauses()
                return try #require(try await group.next())
            }
            #expect(paused.text == "first;second;")
            let headed = try #require(estimate.estimate)
            #expect(headed < hedged, "a sample below the estimate lowers it: \(headed) after \(hedged)")
        }
    }

    @Test("which requests are copied, and how the header is read", arguments: [
        (HTTPMethod.GET, true, nil, HedgePolicy.Plan.hedged(atOnce: 1, timed: true, maxCopies: 3)),
        (.HEAD, true, nil, .hedged(atOnce: 1, timed: true, maxCopies: 3)),
        (.OPTIONS, true, nil, .hedged(atOnce: 1, timed: true, maxCopies: 3)),
        (.PUT, true, nil, .hedged(atOnce: 1, timed: true, maxCopies: 3)),
        (.DELETE, true, "2", .hedged(atOnce: 2, timed: false, maxCopies: 2)),
        (.GET, true, "9", .hedged(atOnce: 4, timed: false, maxCopies: 4)),
        (.GET, true, "1", .hedged(atOnce: 1, timed: true, maxCopies: 3)),
        (.GET, false, "2", .single),
        (.POST, true, nil, .single),
        (.POST, true, "2", .single),
        (.PATCH, true, "2", .single),
        (.GET, true, "x", .refused(.badReplicas("x", cap: 4))),
        (.POST, true, "0", .refused(.badReplicas("0", cap: 4))),
    ] as [(HTTPMethod, Bool, String?, HedgePolicy.Plan)])
    func plans(method: HTTPMethod, replayable: Bool, replicas: String?, expected: HedgePolicy.Plan) {
        let policy = HedgePolicy(after: .milliseconds(10), maxCopies: 3, maxReplicas: 4)
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: "/")
        if let replicas { head.headers.add(name: "X-Balancer-Replicas", value: replicas) }
        #expect(policy.plan(for: &head, replayable: replayable) == expected)
        #expect(head.headers["x-balancer-replicas"].isEmpty, "removed before forwarding")
    }
}

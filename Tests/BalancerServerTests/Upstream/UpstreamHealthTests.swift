import BalancerServer
import NIOCore
import NIOHTTP1
import Testing

@Suite("UpstreamHealthTests")
struct UpstreamHealthTests {
    @Test func healthStateFallsAfterFallFailuresAndRisesAfterRiseSuccesses() {
        var state = HealthState(rise: 2, fall: 3)
        #expect(state.isUp)
        // A success resets the failure streak; a failure resets the success streak.
        let results = [false, false, true, false, false, false, true, false, true, true]
        let transitions = results.map { state.record(success: $0) }
        #expect(transitions == [nil, nil, nil, nil, nil, false, nil, nil, nil, true])
        #expect(state.isUp)

        var cautious = HealthState(rise: 1, fall: 1, initiallyUp: false)
        #expect(!cautious.isUp)
        let first = cautious.record(success: true)
        #expect(first == true)
    }

    @Test func passiveHealthEjectsAfterConsecutiveFailuresForTheCoolDown() {
        let start = ContinuousClock.now
        var health = PassiveHealth(maxFailures: 3, coolDown: .seconds(10))
        var ejections: [Bool] = []
        ejections.append(health.recordFailure(now: start))
        health.recordSuccess()
        for _ in 0..<3 { ejections.append(health.recordFailure(now: start)) }
        #expect(ejections == [false, false, false, true])
        #expect(health.isEjected(now: start + .seconds(5)))
        // Failures reported by requests still in flight during the ejection do not extend it.
        let late = health.recordFailure(now: start + .seconds(5))
        #expect(!late)
        #expect(!health.isEjected(now: start + .seconds(10)))
        #expect(health.consecutiveFailures == 0)
    }

    @Test func checkerMarksABackendDownWhenStoppedAndUpWhenRestarted() async throws {
        let first = try await UpstreamTestBackend.start()
        let port = first.port
        let backend = try Backend(name: "checked", url: "http://127.0.0.1:\(port)")
        let (transitions, continuation) = AsyncStream<HealthChecker.Transition>.makeStream()
        let checker = HealthChecker(
            backend: backend,
            configuration: .init(
                path: "/status?code=200",
                interval: .milliseconds(50),
                // Generous: a check timing out on a loaded machine would count as a
                // failure and could mark the backend down before it is stopped. A
                // stopped backend refuses connections at once, whatever the timeout.
                timeout: .seconds(5),
                rise: 2,
                fall: 2
            ),
            onTransition: { continuation.yield($0) }
        )
        let running = Task { try await checker.run() }
        var events = transitions.makeAsyncIterator()

        let clock = ContinuousClock()
        let waitUntil = clock.now + .seconds(20)
        while checker.status.checks < 2 && clock.now < waitUntil { try await Task.sleep(for: .milliseconds(20)) }
        #expect(checker.status.isUp)
        #expect(checker.status.checks >= 2)
        #expect(checker.status.lastCheck?.status == .ok)

        await first.stop()
        let down = try #require(await events.next())
        #expect(down.isUp == false)
        #expect(down.backend.name == "checked")
        #expect(down.check.succeeded == false)
        #expect(checker.status.isUp == false)

        let second = try await UpstreamTestBackend.start(port: port)
        let up = try #require(await events.next())
        #expect(up.isUp)
        #expect(up.check.status == .ok)
        let latency = try #require(checker.status.lastCheck?.latency)
        #expect(latency > .zero && latency < .seconds(5), "a measured latency, within the timeout: \(latency)")

        running.cancel()
        try await running.value
        continuation.finish()
        await second.stop()
    }

    @Test func checkerCountsAnErrorStatusAsAFailedCheck() async throws {
        try await withUpstreamBackend { server in
            let checker = HealthChecker(
                backend: try Backend(url: "http://127.0.0.1:\(server.port)"),
                configuration: .init(path: "/status?code=503", rise: 1, fall: 1),
                onTransition: { _ in }
            )
            let result = await checker.checkOnce()
            #expect(result.status == .serviceUnavailable)
            #expect(result.succeeded == false)
            #expect(checker.status.isUp == false)
        }
    }
}

@Suite("UpstreamBackendTests")
struct UpstreamBackendTests {
    @Test func parsesHTTPURLs() throws {
        let plain = try Backend(url: "http://127.0.0.1:9001")
        #expect(plain.host == "127.0.0.1" && plain.port == 9001 && plain.name == "127.0.0.1:9001")
        let named = try Backend(name: "api-1", url: "HTTP://api.internal/")
        #expect(named.host == "api.internal" && named.port == 80 && named.name == "api-1")
        #expect(named.hostHeader == "api.internal")
        let v6 = try Backend(url: "http://[::1]:8080")
        #expect(v6.host == "::1" && v6.port == 8080 && v6.hostHeader == "[::1]:8080")
    }

    @Test(arguments: [
        ("https://127.0.0.1:9001", "https"),
        ("ftp://host", "scheme"),
        ("127.0.0.1:9001", "expected http://"),
        ("http://", "host is missing"),
        ("http://host:0", "port"),
        ("http://host:70000", "port"),
        ("http://host:abc", "port"),
        ("http://host/api", "path"),
        ("http://user@host", "user info"),
        ("http://::1", "brackets"),
    ])
    func rejectsUnusableURLsWithAClearMessage(url: String, mentions: String) {
        let error = #expect(throws: BackendURLError.self) { try Backend(url: url) }
        #expect(error?.description.contains(mentions) == true, "\(String(describing: error))")
        #expect(error?.url == url)
    }

    @Test func retryPolicyFollowsThePhaseOfTheFailure() {
        func error(_ kind: UpstreamError.Kind) -> UpstreamError { UpstreamError(kind, backend: "b", detail: "") }
        #expect(error(.connectFailed).isRetryable(method: .POST, bodyReplayable: false))
        #expect(error(.closedBeforeRequestSent).isRetryable(method: .PATCH, bodyReplayable: false))
        #expect(error(.failedAfterRequestSent).isRetryable(method: .GET, bodyReplayable: true))
        #expect(!error(.failedAfterRequestSent).isRetryable(method: .POST, bodyReplayable: true))
        #expect(!error(.failedAfterRequestSent).isRetryable(method: .PUT, bodyReplayable: false))
        #expect(!error(.responseTimeout).isRetryable(method: .GET, bodyReplayable: true))
        #expect(!error(.responseTruncated).isRetryable(method: .GET, bodyReplayable: true))
        #expect(error(.invalidResponse).kind.suggestedStatus == .badGateway)
        #expect(error(.responseTimeout).kind.suggestedStatus == .gatewayTimeout)
    }

    @Test func statsCountResponsesByClassErrorsAndBytes() {
        var stats = UpstreamStats()
        stats.record(
            ForwardResult(
                status: .ok,
                requestBodyBytes: 10,
                responseBodyBytes: 100,
                reusedConnection: false,
                keptAlive: true
            )
        )
        stats.record(
            ForwardResult(
                status: .notFound,
                requestBodyBytes: 0,
                responseBodyBytes: 5,
                reusedConnection: true,
                keptAlive: true
            )
        )
        stats.record(
            ForwardResult(
                status: .badGateway,
                requestBodyBytes: 0,
                responseBodyBytes: 0,
                reusedConnection: true,
                keptAlive: true
            )
        )
        stats.record(UpstreamError(.responseTimeout, backend: "b", detail: "", requestBodyBytes: 3))
        #expect(stats.responses == 3)
        #expect(stats.responses2xx == 1 && stats.responses4xx == 1 && stats.responses5xx == 1)
        #expect(stats.errors[.responseTimeout] == 1 && stats.errorCount == 1)
        #expect(stats.bytesOut == 13 && stats.bytesIn == 105)
    }
}

import BalancerCore
import BalancerServer
import Foundation
import Synchronization
import Testing

#if canImport(FoundationXML)
import FoundationXML
#endif

@Suite("balancer experiment: the talk's requesters against every strategy")
struct ExperimentTests {
    @Test("a one-second run of every strategy gives JSON with each of them and an SVG that parses as XML")
    func smallRun() async throws {
        var settings = Experiment.Configuration()
        settings.requesters = 20
        settings.workers = 4
        settings.thinkMilliseconds = 20
        settings.work = .exponential(meanMilliseconds: 2)
        settings.limit = .duration(.seconds(1))
        let progress = ProgressLog()
        let results = try await Experiment.run(settings) { progress.record($0) }

        #expect(results.map(\.strategy) == Strategy.allCases.map(\.rawValue))
        for result in results {
            #expect(result.requests >= settings.requesters, "every requester sends at least one request")
            #expect(result.errors == 0)
            #expect(result.latency.totalCount == UInt64(result.requests))
            #expect(result.elapsed >= .seconds(1), "requesters go on until the second has passed")
            #expect(!result.samples.isEmpty)
            #expect(result.latencyMilliseconds(at: 50) <= result.latencyMilliseconds(at: 99))
            #expect(result.latencyMilliseconds(at: 99) <= result.maxLatencyMilliseconds)
        }
        let fractions = progress.all
        #expect(fractions == fractions.sorted(), "progress only moves forward")
        #expect((fractions.last ?? 0) > 0.9)

        let json = ExperimentReport.json(results, settings)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let rows = try #require(object["results"] as? [[String: Any]])
        #expect(rows.compactMap { $0["strategy"] as? String } == Strategy.allCases.map(\.rawValue))
        for row in rows {
            let latency = try #require(row["latency_ms"] as? [String: Any])
            for key in ["p50", "p90", "p99", "max"] { #expect(latency[key] is NSNumber, "\(key)") }
            for key in ["requests", "throughput", "pending_mean", "pending_variance"] { #expect(row[key] is NSNumber, "\(key)") }
        }

        let table = ExperimentReport.table(results, settings)
        #expect(table.split(separator: "\n").count == 2 + Strategy.allCases.count)

        let svg = ExperimentSVG.render(results, settings)
        let parser = XMLParser(data: Data(svg.utf8))
        let collector = SVGCollector()
        parser.delegate = collector
        #expect(parser.parse(), "the SVG is well-formed XML: \(String(describing: parser.parserError))")
        #expect(collector.root == "svg")
        #expect(collector.polylines == 2 * Strategy.allCases.count, "a CDF and a variance line per strategy")
        for strategy in Strategy.allCases {
            #expect(collector.texts.contains(strategy.rawValue), "the legend names \(strategy.rawValue)")
        }
        #expect(!svg.contains("<script") && !svg.contains("@import") && !svg.contains("href"), "self-contained")
    }

    @Test("on skewed work least-loaded's p99 is far below round-robin's")
    func leastLoadedBeatsRoundRobinOnSkewedWork() async throws {
        // One job in 250 takes 500 ms. With no more requesters than workers,
        // least-loaded always finds an idle worker, so no request ever waits
        // behind a slow job and its p99 is a fast job's, a few ms. Round-robin
        // keeps sending every eighth request to the worker stuck on a slow
        // job, so several percent of requests wait behind one: its p99 is
        // hundreds of ms. A second seed is tried before failing: a machine
        // stalled for half a second can blur one run.
        var settings = Experiment.Configuration()
        settings.requesters = 8
        settings.workers = 8
        settings.thinkMilliseconds = 20
        settings.work = .bimodal(fastMilliseconds: 3, slowMilliseconds: 500, slowFraction: 0.004)
        settings.limit = .requests(1_500)
        settings.strategies = [.leastLoaded, .roundRobin]
        var outcomes: [String] = []
        for seed: UInt64 in [7, 8] {
            settings.seed = seed
            let results = try await Experiment.run(settings)
            #expect(results.allSatisfy { $0.requests == 1_500 && $0.errors == 0 })
            let leastLoaded = results[0].latencyMilliseconds(at: 99)
            let roundRobin = results[1].latencyMilliseconds(at: 99)
            outcomes.append("seed \(seed): p99 least-loaded \(leastLoaded) ms, round-robin \(roundRobin) ms")
            if roundRobin > 100 && leastLoaded * 3 < roundRobin
                && results[0].pendingVariance < results[1].pendingVariance
            {
                return
            }
        }
        Issue.record("least-loaded's p99 was not well below round-robin's: \(outcomes.joined(separator: "; "))")
    }
}

extension ExperimentTests {
    @Test("over HTTP the requesters post sleep jobs to a running server and measure its strategy")
    func againstAServer() async throws {
        try await withServer({ $0.workers = 3; $0.strategy = .powerOfTwoChoices }) { server in
            var settings = Experiment.Configuration()
            settings.requesters = 6
            settings.thinkMilliseconds = 5
            settings.work = .constant(milliseconds: 2)
            settings.limit = .requests(120)
            let client = try HTTPClient(url: "http://127.0.0.1:\(server.port)")
            let results = try await Experiment.run(settings, target: .server(client))
            #expect(results.map(\.strategy) == ["power-of-two"], "the server's own strategy")
            let result = try #require(results.first)
            #expect(result.requests == 120 && result.errors == 0)
            #expect(result.latencyMilliseconds(at: 50) >= 2, "a 2 ms sleep takes at least 2 ms")
            #expect(!result.samples.isEmpty)
            // Counted when each worker reports done, just after its answer went out.
            #expect(try await eventually { await server.balancer.stats().completed == 120 }, "every job reached the server's balancer")
            let stats = await server.balancer.stats()
            #expect(stats.workers.allSatisfy { $0.completed > 0 })
        }
    }
}

/// Progress fractions in the order they were reported.
private final class ProgressLog: Sendable {
    private let fractions = Mutex<[Double]>([])
    func record(_ fraction: Double) { fractions.withLock { $0.append(fraction) } }
    var all: [Double] { fractions.withLock { $0 } }
}

/// Counts what an SVG holds, as XMLParser reads it.
private final class SVGCollector: NSObject, XMLParserDelegate {
    var root: String?
    var polylines = 0
    var texts: [String] = []
    private var inText = false

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
        if root == nil { root = name }
        if name == "polyline" { polylines += 1 }
        if name == "text" { inText = true; texts.append("") }
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) {
        if inText { texts[texts.count - 1] += string }
    }

    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        if name == "text" { inText = false }
    }
}

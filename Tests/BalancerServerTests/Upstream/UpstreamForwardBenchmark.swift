import BalancerServer
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A response writer that drops everything: the benchmark measures forward() alone.
private struct DroppingResponseWriter: ProxyResponseWriter {
    func writeHead(_ head: HTTPResponseHead) async throws {}
    func writeBody(_ buffer: ByteBuffer) async throws {}
    func end(trailers: HTTPHeaders?) async throws {}
}

private func environment(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
}

/// Throughput of ``UpstreamConnection/forward(_:body:forwarding:to:)`` on loopback:
/// K workers, each with its own connection, forwarding `GET` back to back for a
/// few seconds. A benchmark, not a test: it runs only when `UPSTREAM_BENCH_URL`
/// names a backend (e.g. an nginx serving a small static file), best in release:
///
///     UPSTREAM_BENCH_URL=http://127.0.0.1:19101/ UPSTREAM_BENCH_CONNECTIONS=16 \
///       swift test -c release --scratch-path .build-upstream-release --filter UpstreamForwardBenchmark
@Suite("UpstreamForwardBenchmark")
struct UpstreamForwardBenchmark {
    @Test(.enabled(if: environment("UPSTREAM_BENCH_URL") != nil))
    func forwardThroughput() async throws {
        let url = try #require(environment("UPSTREAM_BENCH_URL"))
        let workers = Int(environment("UPSTREAM_BENCH_CONNECTIONS") ?? "") ?? 16
        let seconds = Int(environment("UPSTREAM_BENCH_SECONDS") ?? "") ?? 5
        let path = environment("UPSTREAM_BENCH_PATH") ?? "/"
        let backend = try Backend(url: url)
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: ["Host": backend.hostHeader])
        let group = MultiThreadedEventLoopGroup.singleton
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(seconds)

        let perWorker = try await withThrowingTaskGroup(of: (Int, [Duration], Int).self) { tasks in
            for _ in 0..<workers {
                tasks.addTask {
                    let connection = UpstreamConnection(backend: backend, eventLoop: group.next())
                    var count = 0
                    var bytes = 0
                    var latencies: [Duration] = []
                    latencies.reserveCapacity(200_000)
                    while clock.now < deadline {
                        let started = clock.now
                        let result = try await connection.forward(
                            head,
                            body: EmptyBody(),
                            forwarding: ForwardedFor(clientAddress: "127.0.0.1"),
                            to: DroppingResponseWriter()
                        )
                        latencies.append(clock.now - started)
                        bytes += result.responseBodyBytes
                        count += 1
                    }
                    await connection.close()
                    return (count, latencies, bytes)
                }
            }
            var all: [(Int, [Duration], Int)] = []
            for try await result in tasks { all.append(result) }
            return all
        }
        let total = perWorker.reduce(0) { $0 + $1.0 }
        let latencies = perWorker.flatMap(\.1).sorted()
        let p50 = latencies[latencies.count / 2]
        let p99 = latencies[latencies.count * 99 / 100]
        let rate = Double(total) / Double(seconds)
        print(
            "forward() \(url)\(path): \(workers) connections, \(total) requests in \(seconds) s: "
                + "\(Int(rate)) req/s, p50 \(p50), p99 \(p99), body bytes \(perWorker.reduce(0) { $0 + $1.2 })"
        )
        #expect(total > 0)
    }
}

extension UpstreamForwardBenchmark {
    /// Serves the test's minimal proxy (``MiniUpstreamProxy``: server pipeline,
    /// RequestBodyStream, a task per request, a writer onto the client channel, one upstream
    /// connection per client connection) in front of `UPSTREAM_BENCH_URL` on
    /// `UPSTREAM_BENCH_PROXY_PORT` for `UPSTREAM_BENCH_PROXY_SECONDS`, for a load
    /// generator such as wrk to measure the whole proxying path without the balancer.
    @Test(.enabled(if: environment("UPSTREAM_BENCH_PROXY_SECONDS") != nil))
    func serveMiniProxyForLoad() async throws {
        let backend = try Backend(url: try #require(environment("UPSTREAM_BENCH_URL")))
        let seconds = Int(environment("UPSTREAM_BENCH_PROXY_SECONDS") ?? "") ?? 10
        let port = Int(environment("UPSTREAM_BENCH_PROXY_PORT") ?? "") ?? 0
        let proxy = try await MiniUpstreamProxy.start(to: backend, port: port)
        print("mini proxy listening on 127.0.0.1:\(proxy.port) for \(seconds) s")
        try await Task.sleep(for: .seconds(seconds))
        await proxy.stop()
    }
}

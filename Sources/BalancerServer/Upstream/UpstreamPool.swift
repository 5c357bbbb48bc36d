import BalancerCore
import NIOCore
import NIOHTTP1
import Synchronization

/// An upstream pool: the talk's balancer in front of real backends.
///
/// Each backend gets K workers (K = its connection limit, like HAProxy's
/// per-server `maxconn`); worker `w` belongs to backend `w % B` (B backends,
/// interleaved so that ties between idle workers alternate backends) and owns
/// `connections[w]`, one keep-alive connection it uses one request at a time.
/// A request is the talk's `Request` whose operation is "forward this over my
/// connection", so the heap gives it to the connection with the least pending.
///
/// Failures: a retryable failure (``UpstreamError/Kind/retry``) is tried again
/// on another worker, up to `retries` more times. `maxFails` consecutive
/// failures of a backend eject it (its workers are marked down in the
/// balancer, so its queued requests move to other backends) for `failTimeout`,
/// as nginx's `max_fails` and `fail_timeout` do.
public final class UpstreamPool: Sendable {
    /// The pool's own balancer; run it in the service group.
    public let balancer: Balancer
    public let backends: [Backend]
    /// K.
    public let connectionsPerBackend: Int
    let retries: Int
    let failTimeout: Duration
    /// When requests are copied to other backends (see ``HedgePolicy``).
    public let hedging: HedgePolicy
    let hedgeStats: Mutex<HedgeStats>
    private let connections: [UpstreamConnection]
    private let state: Mutex<State>

    private struct State {
        var workers: [UpstreamStats]
        var retries: [Int]
        var passive: [PassiveHealth]
        var ejections: [Int]
    }

    /// - Parameter configuration: `upstreams`, `connections_per_upstream`,
    ///   the `upstream_*` settings and the balancer's backlog, timeout and strategy.
    public init(configuration: ServerConfiguration, eventLoopGroup: any EventLoopGroup) throws {
        let backends = try configuration.upstreams.enumerated().map { index, url in
            try Backend(name: "backend\(index + 1)", url: url)
        }
        let k = configuration.connectionsPerUpstream
        let upstreamConfiguration = UpstreamConfiguration(
            connectTimeout: .milliseconds(configuration.upstreamConnectTimeoutMilliseconds),
            responseHeaderTimeout: .milliseconds(configuration.upstreamResponseTimeoutMilliseconds)
        )
        self.backends = backends
        self.connectionsPerBackend = k
        self.retries = configuration.upstreamRetries
        self.failTimeout = .milliseconds(configuration.upstreamFailTimeoutMilliseconds)
        self.hedging = configuration.upstreamHedging
        self.hedgeStats = Mutex(HedgeStats(copies: max(hedging.maxCopies, hedging.maxReplicas)))
        self.connections = (0..<backends.count * k).map { worker in
            UpstreamConnection(
                backend: backends[worker % backends.count], configuration: upstreamConfiguration,
                eventLoop: eventLoopGroup.next())
        }
        self.balancer = Balancer(configuration: configuration.upstreamBalancer)
        let passive = PassiveHealth(
            maxFailures: configuration.upstreamMaxFails,
            coolDown: .milliseconds(configuration.upstreamFailTimeoutMilliseconds)
        )
        self.state = Mutex(
            State(
                workers: Array(repeating: UpstreamStats(), count: backends.count * k),
                retries: Array(repeating: 0, count: backends.count),
                passive: Array(repeating: passive, count: backends.count),
                ejections: Array(repeating: 0, count: backends.count)
            )
        )
    }

    /// Index of the backend that worker `worker` belongs to.
    func backendIndex(of worker: Int) -> Int { worker % backends.count }

    /// What happened to one proxied request.
    public enum Outcome: Sendable {
        /// The backend's response went to the client: the worker that forwarded
        /// it (on the last try), and the exchange.
        case forwarded(Served, ForwardResult)
        /// Nothing was written to the client: answer it with this error.
        case failed(APIError)
        /// The response head was already out when it broke, or the client went
        /// away: the client connection must be closed.
        case abort
    }

    /// Forwards one client request through the balancer, with retries.
    ///
    /// - Parameters:
    ///   - body: the request body; `replayable` says whether it can be sent again
    ///     after a failure that may have consumed some of it.
    ///   - writer: the client's side; ``ClientResponseWriter/headWritten`` tells
    ///     whether an error can still be answered.
    public func proxy<Body: AsyncSequence & Sendable>(
        _ head: HTTPRequestHead,
        body: Body,
        replayable: Bool,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) async -> Outcome where Body.Element == ByteBuffer {
        var planned = head
        switch hedging.plan(for: &planned, replayable: replayable) {
        case .single: break
        case .hedged(let atOnce, let after, let maxCopies):
            return await hedge(
                planned, body: body, atOnce: atOnce, after: after, maxCopies: maxCopies, forwarding: forwarding,
                to: writer)
        case .refused(let error): return .failed(error)
        }
        let head = planned
        var lastError: UpstreamError?
        for attempt in 0...retries {
            do {
                let receipt = try await balancer.submitOnWorker { worker in
                    try await self.forward(on: worker, head, body: body, forwarding: forwarding, to: writer)
                }
                return forwarded(receipt)
            } catch let error as UpstreamError {
                lastError = error
                if writer.headWritten || error.kind == .clientAborted { return .abort }
                guard error.isRetryable(method: head.method, bodyReplayable: replayable), attempt < retries else { break }
                countRetry(on: error.backend)
            } catch let error as BalancerError {
                if error == .cancelled { return .abort }
                if error == .unavailable, let lastError {
                    return .failed(.noHealthyBackend(after: lastError))
                }
                return .failed(APIError(error))
            } catch {
                return .failed(APIError(error))
            }
        }
        guard let lastError else { return .failed(APIError(BalancerError.unavailable)) }
        return .failed(APIError(lastError))
    }

    /// Counts a retry against the backend named `backend`.
    func countRetry(on backend: String) {
        if let index = backends.firstIndex(where: { $0.name == backend }) {
            state.withLock { $0.retries[index] += 1 }
        }
    }

    /// The operation a worker runs: forward over its own connection, count the
    /// result, and eject the backend after too many failures in a row.
    func forward<Body: AsyncSequence & Sendable>(
        on worker: Int,
        _ head: HTTPRequestHead,
        body: Body,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) async throws -> ForwardResult where Body.Element == ByteBuffer {
        let index = backendIndex(of: worker)
        do {
            let result = try await connections[worker].forward(head, body: body, forwarding: forwarding, to: writer)
            state.withLock { state in
                state.workers[worker].record(result)
                state.passive[index].recordSuccess()
            }
            return result
        } catch {
            let eject = state.withLock { state -> Bool in
                state.workers[worker].record(error)
                guard error.kind.countsAgainstBackend else { return false }
                let eject = state.passive[index].recordFailure()
                if eject { state.ejections[index] += 1 }
                return eject
            }
            if eject { await ejectBackend(index) }
            throw error
        }
    }

    /// The outcome of a forward that reached the client, naming its worker and backend.
    func forwarded(_ receipt: Receipt<ForwardResult>) -> Outcome {
        let backend = backends[backendIndex(of: receipt.worker)].name
        return .forwarded(
            Served(worker: receipt.worker, backend: backend, queued: receipt.queued, ran: receipt.ran), receipt.value)
    }

    /// Marks every worker of backend `index` down now, and up again after the fail timeout.
    private func ejectBackend(_ index: Int) async {
        let workers = workerIDs(of: index)
        for worker in workers { await balancer.markDown(worker) }
        let balancer = self.balancer
        let failTimeout = self.failTimeout
        Task {
            try? await Task.sleep(for: failTimeout)
            for worker in workers { await balancer.markUp(worker) }
        }
    }

    func workerIDs(of index: Int) -> StrideTo<Int> {
        stride(from: index, to: backends.count * connectionsPerBackend, by: backends.count)
    }

    /// Per-backend and per-worker figures for `/stats`, joined with the balancer's own.
    ///
    /// - Parameter latency: with metrics on, each worker and the pool get `latency_us`.
    func statsJSON(latency: StatsRendering.Latency? = nil) async -> JSONValue {
        let snapshot = await balancer.stats()
        let (workers, retries, ejections) = state.withLock { ($0.workers, $0.retries, $0.ejections) }
        let byID = Dictionary(uniqueKeysWithValues: snapshot.workers.map { ($0.id, $0) })
        var items: [JSONValue] = []
        for (id, figures) in workers.enumerated() {
            let backend = backends[backendIndex(of: id)]
            let core = byID[id]
            var fields: [(key: String, value: JSONValue)] = [
                ("id", JSONValue(id)),
                ("backend", .string(backend.name)),
                ("url", .string(backend.url)),
                ("state", .string(core?.state.rawValue ?? "gone")),
                ("pending", JSONValue(core?.pending ?? 0)),
                ("requests", JSONValue(figures.responses + figures.errorCount)),
                (
                    "responses",
                    .object(
                        JSONObject([
                            ("2xx", JSONValue(figures.responses2xx)), ("3xx", JSONValue(figures.responses3xx)),
                            ("4xx", JSONValue(figures.responses4xx)), ("5xx", JSONValue(figures.responses5xx)),
                        ])
                    )
                ),
                (
                    "errors",
                    .object(
                        JSONObject(UpstreamError.Kind.allCases.map { ($0.rawValue, JSONValue(figures.errors[$0] ?? 0)) })
                    )
                ),
                ("bytes_in", JSONValue(figures.bytesIn)),
                ("bytes_out", JSONValue(figures.bytesOut)),
            ]
            if let estimate = core?.latencyEstimate {
                fields.append(("latency_estimate_us", JSONValue(estimate.microseconds)))
            }
            if let latency { fields.append(("latency_us", StatsRendering.latencyJSON(latency, worker: id))) }
            items.append(.object(JSONObject(fields)))
        }
        let backendItems: [JSONValue] = backends.enumerated().map { index, backend in
            .object(
                JSONObject([
                    ("name", .string(backend.name)), ("url", .string(backend.url)),
                    ("connections", JSONValue(connectionsPerBackend)),
                    ("retries", JSONValue(retries[index])), ("ejections", JSONValue(ejections[index])),
                ])
            )
        }
        let pool: JSONValue = .object(
            JSONObject([
                ("strategy", .string(snapshot.strategy.rawValue)),
                ("backends", .array(backendItems)),
                ("workers", .array(items)),
                (
                    "queue",
                    .object(
                        JSONObject([
                            ("depth", JSONValue(snapshot.backlogDepth)), ("limit", JSONValue(snapshot.backlogLimit)),
                            ("overloaded", JSONValue(snapshot.overloaded)),
                            ("timed_out", JSONValue(snapshot.queueTimeouts)),
                            ("unavailable", JSONValue(snapshot.unavailable)),
                        ])
                    )
                ),
                ("pending_mean", JSONValue(snapshot.pendingMean)),
                ("pending_variance", JSONValue(snapshot.pendingVariance)),
                ("hedging", hedgeStats.withLock { $0.json }),
            ])
        )
        guard let latency, case .object(var object) = pool else { return pool }
        object.members.append((key: "latency_us", value: latency.pool.json))
        return .object(object)
    }
}

/// The client's side of a proxied exchange: a ``ProxyResponseWriter`` that
/// also tells whether the response head has gone out.
public protocol ClientResponseWriting: ProxyResponseWriter {
    /// Whether ``writeHead(_:)`` has been called: after it, an error can only
    /// close the connection.
    var headWritten: Bool { get }
}

extension UpstreamError.Kind {
    /// Whether this failure says something about the backend (and counts
    /// towards ejecting it), rather than about the client.
    var countsAgainstBackend: Bool {
        switch self {
        case .clientAborted: false
        default: true
        }
    }
}

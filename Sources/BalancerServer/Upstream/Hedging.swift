import BalancerCore
import NIOCore
import NIOHTTP1
import Synchronization

/// When an upstream pool sends copies of a request: the talk's replicated
/// query, as hedging (Finagle's backup requests, Envoy's hedge on per-try
/// timeout).
///
/// Only a request with an idempotent method (RFC 9110: GET, HEAD, OPTIONS,
/// TRACE, PUT, DELETE) and a replayable body (the proxy streams request bodies,
/// so in practice: no body) is ever copied; POST never is.
///
/// - Timed: when no response head has arrived `after` a copy started, one more
///   copy starts, up to `maxCopies` in all.
/// - Asked for: `X-Balancer-Replicas: N` starts N copies at once (each as soon
///   as the one before it is on a worker), and no timed ones. N is capped at
///   `maxReplicas`; when that is 1 the header is refused with 400.
///
/// Every copy after the first, timed or asked for, is held to a budget, as
/// Finagle's backup requests are (`maxExtraLoad`): at most `budgetPercent`
/// copies per 100 requests sent here, with a burst of ``HedgeBudget/burst``
/// copies, so a pool whose backends all slow down is not sent twice its load.
///
/// Every copy after the first runs only on spare capacity: on the least-loaded
/// worker with room whose backend no other copy of the request uses
/// (``Balancer/submitOnWorker(ifRoomAmong:waitingAtMost:_:)``). When there is
/// none it never waits in the backlog: it waits beside it, for the first such
/// worker to free up, ahead of the requests in the backlog, and only while
/// no other copy has answered (at most the pool's response timeout, the
/// longest the first copy may wait for its head). Under a closed loop, where
/// every worker is nearly always busy, that is what lets a copy run at all:
/// it takes the next worker a fast backend frees.
///
/// The first copy whose response head arrives wins the client and streams its
/// response; a 5xx head wins too (it is an answer, and bodies are not
/// buffered). A copy that fails before a head (refused, reset, timed out,
/// invalid) does not win: the others go on, and when none is left the failure
/// is retried by the pool's usual rules. At the win the others are cancelled:
/// a queued one is withdrawn without running, a running one has its upstream
/// connection closed (never reused mid-response), and each worker's `pending`
/// falls once, when its operation ends.
public struct HedgePolicy: Sendable, Hashable {
    /// Start another copy after this long without a response head; `nil`: never.
    public var after: Duration?
    /// Most copies of one request for timed hedging, the first included.
    public var maxCopies: Int
    /// Most copies `X-Balancer-Replicas` may ask for; 1 forbids the header.
    public var maxReplicas: Int
    /// Copies per 100 requests that could be hedged, at most.
    public var budgetPercent: Int

    public init(after: Duration?, maxCopies: Int, maxReplicas: Int, budgetPercent: Int = 10) {
        self.after = after
        self.maxCopies = maxCopies
        self.maxReplicas = maxReplicas
        self.budgetPercent = budgetPercent
    }

    /// The request header that asks for copies at once.
    static let replicasHeader = "x-balancer-replicas"

    /// How to send one request.
    enum Plan: Equatable {
        /// One copy, with the pool's retries.
        case single
        /// `atOnce` copies at once, then timed ones after `after` up to `maxCopies`.
        case hedged(atOnce: Int, after: Duration?, maxCopies: Int)
        /// The request asked for something the configuration does not allow.
        case refused(APIError)
    }

    /// Decides how `head` is sent, and removes `X-Balancer-Replicas` from it
    /// (it is for the balancer, not the backend).
    func plan(for head: inout HTTPRequestHead, replayable: Bool) -> Plan {
        var asked = 1
        if let value = head.headers.first(name: Self.replicasHeader) {
            head.headers.remove(name: Self.replicasHeader)
            guard let count = Int(value), count >= 1 else {
                return .refused(.badReplicas(value, cap: maxReplicas))
            }
            if count > 1 && maxReplicas == 1 { return .refused(.replicasForbidden) }
            asked = min(count, maxReplicas)
        }
        guard replayable && head.method.isIdempotent else { return .single }
        if asked > 1 { return .hedged(atOnce: asked, after: nil, maxCopies: asked) }
        if let after, maxCopies > 1 { return .hedged(atOnce: 1, after: after, maxCopies: maxCopies) }
        return .single
    }
}

extension HedgePolicy {
    /// Allowed values, shared by the top-level `upstream_hedge_*` keys and a
    /// pool's `hedge` object.
    static let afterRange: ClosedRange<Int64> = 0...3_600_000
    static let copiesRange: ClosedRange<Int> = 1...16
    static let budgetRange: ClosedRange<Int> = 1...100

    /// The fields of a pool's `hedge` object in the config file: `after_ms`
    /// (0: no timed copies), `max`, `max_replicas`, `budget_percent`. A field
    /// left out has its top-level key's default.
    static let keys: [ObjectKey<HedgePolicy>] = [
        .custom(
            "after_ms",
            set: { (policy, json, path) throws(ConfigurationError) in
                let milliseconds = try json.configInt64(path, range: afterRange)
                policy.after = milliseconds > 0 ? .milliseconds(milliseconds) : nil
            },
            get: { JSONValue($0.after?.milliseconds ?? 0) }
        ),
        .int("max", \.maxCopies, range: copiesRange),
        .int("max_replicas", \.maxReplicas, range: copiesRange),
        .int("budget_percent", \.budgetPercent, range: budgetRange),
    ]
}

extension ServerConfiguration {
    /// The default pool's hedging settings.
    public var upstreamHedging: HedgePolicy {
        HedgePolicy(
            after: upstreamHedgeAfterMilliseconds > 0 ? .milliseconds(upstreamHedgeAfterMilliseconds) : nil,
            maxCopies: upstreamHedgeMax,
            maxReplicas: upstreamMaxReplicas,
            budgetPercent: upstreamHedgeBudgetPercent
        )
    }
}

extension APIError {
    static func badReplicas(_ value: String, cap: Int) -> APIError {
        .badRequest("header X-Balancer-Replicas: \"\(value)\" is not a whole number of copies from 1 to \(cap)")
    }

    static let replicasForbidden = APIError(
        status: .badRequest,
        code: "replicas_forbidden",
        message: "header X-Balancer-Replicas: this balancer sends one copy of each request (upstream_max_replicas is 1)"
    )
}

/// Hedging's figures for `/stats`.
struct HedgeStats: Sendable, Equatable {
    /// Requests that had at least one extra copy start.
    var hedgedRequests = 0
    /// Extra copies that started on a worker (not counting the first, nor retries).
    var copiesSent = 0
    /// Hedged requests won by the copy that started first, second, ...
    var winsByCopy: [Int]
    /// Copies still queued or running when another won, and so cancelled.
    var cancelledLosers = 0
    /// Copies due that found no worker with room on another backend in time.
    var skipped = 0
    /// Copies due that the budget did not allow.
    var overBudget = 0

    init(copies: Int) { winsByCopy = Array(repeating: 0, count: copies) }

    var json: JSONValue {
        .object(
            JSONObject([
                ("hedged_requests", JSONValue(hedgedRequests)),
                ("copies_sent", JSONValue(copiesSent)),
                ("wins_by_copy", .array(winsByCopy.map { JSONValue($0) })),
                ("cancelled_losers", JSONValue(cancelledLosers)),
                ("skipped", JSONValue(skipped)),
                ("over_budget", JSONValue(overBudget)),
            ])
        )
    }
}

/// The pool's allowance of copies: a token bucket in hundredths of a copy.
/// Every request that could be hedged adds `percent`; a copy takes 100. It
/// starts full.
final class HedgeBudget: Sendable {
    /// Copies the bucket holds at most: the burst after a quiet spell.
    static let burst = 10
    private let percent: Int
    private let tokens = Atomic<Int>(HedgeBudget.burst * 100)

    init(percent: Int) { self.percent = percent }

    /// A request that could be hedged arrived.
    func deposit() {
        var current = tokens.load(ordering: .relaxed)
        while current < Self.burst * 100 {
            let next = min(current + percent, Self.burst * 100)
            let (exchanged, original) = tokens.compareExchange(expected: current, desired: next, ordering: .relaxed)
            if exchanged { return }
            current = original
        }
    }

    /// Takes one copy's worth; false (taking nothing) when there is not enough.
    func withdraw() -> Bool {
        var current = tokens.load(ordering: .relaxed)
        while current >= 100 {
            let (exchanged, original) = tokens.compareExchange(expected: current, desired: current - 100, ordering: .relaxed)
            if exchanged { return true }
            current = original
        }
        return false
    }

    /// Gives back a copy's worth that was not used.
    func refund() { tokens.add(100, ordering: .relaxed) }
}

/// One hedged request's copies: who won, which workers they run on, and the
/// tasks to cancel. Shared by the copies' tasks and the request's own task.
final class HedgeRace: Sendable {
    private struct State {
        /// The copy that took the client (by id), once one has.
        var winner: Int?
        /// The client went away: cancel everything.
        var cancelled = false
        /// Running or queued copies, by id.
        var tasks: [Int: Task<Void, Never>] = [:]
        /// Workers of the copies that started.
        var workers: [Int] = []
        /// Copies started so far: a copy's rank is its place in this order.
        var started = 0
        /// Rank of each started copy, by id.
        var ranks: [Int: Int] = [:]
        /// Copies that had started on a worker when another won.
        var losers = 0
    }

    private let state = Mutex(State())

    var winner: Int? { state.withLock { $0.winner } }
    /// The winner's rank (0 for the copy that started first).
    var winnerRank: Int? { state.withLock { state in state.winner.flatMap { state.ranks[$0] } } }
    var losersCancelled: Int { state.withLock { $0.losers } }

    /// Starts copy `id` with `makeTask` and keeps the task to cancel if
    /// another copy wins; starts nothing if one already has, or the client is
    /// gone. The task is made under the lock, so it is known before it can
    /// report ``finished(_:)``.
    func start(_ id: Int, _ makeTask: () -> Task<Void, Never>) -> Bool {
        state.withLock { state in
            guard !state.cancelled, state.winner == nil else { return false }
            state.tasks[id] = makeTask()
            return true
        }
    }

    func finished(_ id: Int) {
        _ = state.withLock { $0.tasks.removeValue(forKey: id) }
    }

    /// Copy `id` started on worker `worker`.
    func started(_ id: Int, worker: Int) {
        state.withLock { state in
            state.workers.append(worker)
            state.ranks[id] = state.started
            state.started += 1
        }
    }

    /// Workers of the copies that started so far.
    var workers: [Int] { state.withLock { $0.workers } }

    /// Copy `id` has a response head: it wins if nobody did yet, and every
    /// other copy is cancelled. Returns whether it won.
    func claim(_ id: Int) -> Bool {
        let losers: [Task<Void, Never>]? = state.withLock { state in
            guard state.winner == nil, !state.cancelled else { return nil }
            state.winner = id
            let losers = state.tasks.filter { $0.key != id }
            state.losers = losers.keys.filter { state.ranks[$0] != nil }.count
            return Array(losers.values)
        }
        guard let losers else { return false }
        for task in losers { task.cancel() }
        return true
    }

    /// The client went away: every copy is cancelled.
    func cancelAll() {
        let tasks = state.withLock { state in
            state.cancelled = true
            return Array(state.tasks.values)
        }
        for task in tasks { task.cancel() }
    }
}

/// The client as one copy sees it: the response head goes through only for
/// the copy that wins the race; a later one throws, which closes its upstream
/// connection (the forwarder treats it as a client that went away).
struct HedgeCopyWriter<Client: ClientResponseWriting>: ClientResponseWriting {
    struct Lost: Error {}

    let race: HedgeRace
    let id: Int
    let client: Client

    var headWritten: Bool { race.winner == id && client.headWritten }

    func writeHead(_ head: HTTPResponseHead) async throws {
        guard race.claim(id) else { throw Lost() }
        try await client.writeHead(head)
    }

    func writeBody(_ buffer: ByteBuffer) async throws { try await client.writeBody(buffer) }

    func end(trailers: HTTPHeaders?) async throws { try await client.end(trailers: trailers) }

    func flush() async throws { try await client.flush() }
}

extension UpstreamPool {
    private enum HedgeEvent: Sendable {
        /// Copy `id` is on a worker.
        case started(id: Int)
        /// The hedge delay passed.
        case timer
        /// Copy `id` ended.
        case finished(id: Int, receipt: Receipt<ForwardResult>?, error: (any Error)?)
    }

    /// Sends `head` as `plan` says, with copies on other backends; the first
    /// response head wins. See ``HedgePolicy``.
    func hedge<Body: AsyncSequence & Sendable>(
        _ head: HTTPRequestHead,
        body: Body,
        atOnce: Int,
        after: Duration?,
        maxCopies: Int,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) async -> Outcome where Body.Element == ByteBuffer {
        let race = HedgeRace()
        hedgeBudget.deposit()
        let patience = Duration.milliseconds(configuration.responseTimeoutMilliseconds)
        let (events, sink) = AsyncStream.makeStream(of: HedgeEvent.self)
        defer { sink.finish() }

        /// Starts copy `id`: the first and retries anywhere, the others only on
        /// spare capacity on a backend no other copy uses. Returns false when
        /// it was too late to start it.
        func launch(_ id: Int, spare: Bool) -> Bool {
            let operation: @Sendable (Int) async throws -> ForwardResult = { worker in
                race.started(id, worker: worker)
                sink.yield(.started(id: id))
                let copyWriter = HedgeCopyWriter(race: race, id: id, client: writer)
                return try await self.forward(on: worker, head, body: body, forwarding: forwarding, to: copyWriter)
            }
            // A later copy starts once the ones before it are on their workers.
            let eligible = spare ? spareWorkers(awayFrom: race.workers) : nil
            return race.start(id) {
                Task {
                    var receipt: Receipt<ForwardResult>?
                    var failure: (any Error)?
                    do {
                        if let eligible {
                            receipt = try await self.balancer.submitOnWorker(
                                ifRoomAmong: eligible, waitingAtMost: patience, operation)
                        } else {
                            receipt = try await self.balancer.submitOnWorker(operation)
                        }
                    } catch {
                        failure = error
                    }
                    race.finished(id)
                    sink.yield(.finished(id: id, receipt: receipt, error: failure))
                }
            }
        }

        return await withTaskCancellationHandler {
            var nextID = 0
            var inFlight = 0
            /// Launched copies not yet on a worker.
            var unstarted: Set<Int> = []
            /// Copies launched to run only on spare capacity (not the first, not retries).
            var spareIDs: Set<Int> = []
            var copiesDue = atOnce - 1
            var hedgesStarted = 0
            var skipped = 0
            var overBudget = 0
            /// Copies paid from the budget, which is given back for any that never starts.
            var budgetedIDs: Set<Int> = []
            var retriesLeft = retries
            var lastError: UpstreamError?
            var outcome: Outcome?
            // A scheduled task on an event loop: much cheaper than a sleeping Task per request.
            var timer: Scheduled<Void>?
            defer { timer?.cancel() }

            func start(spare: Bool) {
                guard launch(nextID, spare: spare) else {
                    // A copy won, or the client is gone.
                    if inFlight == 0 { outcome = .abort }
                    return
                }
                unstarted.insert(nextID)
                if spare { spareIDs.insert(nextID) }
                nextID += 1
                inFlight += 1
            }
            /// Another copy on spare capacity, if the budget allows it.
            func startCopy() {
                guard hedgeBudget.withdraw() else {
                    overBudget += 1
                    return
                }
                let id = nextID
                start(spare: true)
                if nextID > id { budgetedIDs.insert(id) } else { hedgeBudget.refund() }
            }
            /// Another copy after `after`, if one may still go.
            func armTimer() {
                timer?.cancel()
                timer = nil
                guard let after, race.winner == nil, 1 + hedgesStarted < maxCopies else { return }
                timer = eventLoopGroup.any().scheduleTask(in: .nanoseconds(Int64(after / .nanoseconds(1)))) {
                    sink.yield(.timer)
                }
            }

            start(spare: false)
            if let outcome { return outcome }
            for await event in events {
                switch event {
                case .started(let id):
                    unstarted.remove(id)
                    if spareIDs.contains(id) { hedgesStarted += 1 }
                    if copiesDue > 0 && race.winner == nil && outcome == nil {
                        copiesDue -= 1
                        startCopy()
                    } else {
                        armTimer()
                    }
                case .timer:
                    timer = nil
                    if race.winner == nil && outcome == nil && unstarted.isEmpty && 1 + hedgesStarted < maxCopies {
                        startCopy()
                    }
                case .finished(let id, let receipt, let error):
                    inFlight -= 1
                    if unstarted.remove(id) != nil && budgetedIDs.contains(id) { hedgeBudget.refund() }
                    if race.winner == id {
                        // The winner's exchange is over: its response went out, or broke off
                        // (an error can still be answered if its head never left the writer).
                        outcome = receipt.map { forwarded($0) } ?? brokenOff(error, writer: writer)
                    } else if let error, race.winner == nil, outcome == nil {
                        if spareIDs.contains(id), error is BalancerError {
                            // No spare worker on another backend in time (or the balancer is
                            // shutting down): the other copies go on; try again after the delay.
                            skipped += 1
                            if inFlight > 0 { armTimer() }
                        } else {
                            switch error {
                            case let error as UpstreamError where error.kind == .clientAborted:
                                outcome = .abort
                            case let error as UpstreamError:
                                lastError = error
                            case BalancerError.cancelled:
                                outcome = .abort
                            case BalancerError.unavailable:
                                outcome = .failed(lastError.map { .noHealthyBackend(after: $0) } ?? APIError(error))
                            case let error:
                                outcome = .failed(APIError(error))
                            }
                        }
                        if inFlight == 0 && outcome == nil {
                            // Every copy failed before a response head: the pool's retry rules.
                            if let lastError, retriesLeft > 0,
                                lastError.isRetryable(method: head.method, bodyReplayable: true)
                            {
                                retriesLeft -= 1
                                countRetry(on: lastError.backend)
                                start(spare: false)
                            } else {
                                outcome = .failed(lastError.map { APIError($0) } ?? APIError(BalancerError.unavailable))
                            }
                        }
                    }
                }
                if outcome != nil || race.winner != nil {
                    timer?.cancel()
                    timer = nil
                }
                if outcome != nil && inFlight == 0 { break }
            }
            recordHedge(race: race, hedgesStarted: hedgesStarted, skipped: skipped, overBudget: overBudget)
            return outcome ?? .abort
        } onCancel: {
            race.cancelAll()
        }
    }

    /// The outcome of a winning copy that failed: an error answer if its head
    /// never reached the client (the writer still held it), else an abort.
    private func brokenOff(_ error: (any Error)?, writer: some ClientResponseWriting) -> Outcome {
        guard !writer.headWritten, let error = error as? UpstreamError, error.kind != .clientAborted else { return .abort }
        return .failed(APIError(error))
    }

    /// Adds one request's figures to the pool's hedging stats.
    private func recordHedge(race: HedgeRace, hedgesStarted: Int, skipped: Int, overBudget: Int) {
        guard hedgesStarted > 0 || skipped > 0 || overBudget > 0 else { return }
        hedgeStats.withLock { stats in
            stats.skipped += skipped
            stats.overBudget += overBudget
            guard hedgesStarted > 0 else { return }
            stats.hedgedRequests += 1
            stats.copiesSent += hedgesStarted
            stats.cancelledLosers += race.losersCancelled
            if let rank = race.winnerRank, stats.winsByCopy.indices.contains(rank) {
                stats.winsByCopy[rank] += 1
            }
        }
    }
}

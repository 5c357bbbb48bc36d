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
///   copy starts, up to `maxCopies` in all. With `afterPercentile` the delay
///   follows the pool's recent response times instead (Finagle's backup
///   requests): their `afterPercentile`th percentile, never less than `after`.
///   Until the pool has answered once, only `after` applies. A timed copy
///   goes only where it can cut the wait: not while the request's backend
///   can be expected to answer within another delay, and only to backends
///   expected to answer sooner (``ResponseTimes``).
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
/// no other copy has answered and one on a worker still may (at most what is
/// left of the pool's response timeout since the request's own copy, the
/// first or a retry, started: the longest that one may wait for its head). Under a closed loop, where
/// every worker is nearly always busy, that is what lets a copy run at all:
/// it takes the next worker a fast backend frees. With no other backend in
/// rotation (or in a pool of one) no copy goes.
///
/// The first copy whose response head arrives wins the client and streams its
/// response; a 5xx head wins too (it is an answer, and bodies are not
/// buffered). A copy that fails before a head (refused, reset, timed out,
/// invalid) does not win: the others go on, and when none is left the failure
/// is retried by the pool's usual rules. At the win the others are cancelled:
/// a queued one is withdrawn without running, a running one has its upstream
/// connection closed (never reused mid-response, ``ForwardStop``), and each
/// worker's `pending` falls once, when its operation ends. A loser cut off
/// before its head leaves load held on its worker for the rest its backend
/// can be expected to take (``Balancer/holdLoad(on:until:)``).
///
/// With `loserFinish`, a running loser is not cut off at once: it may finish
/// within that time, its response thrown away (at most
/// ``loserFinishBytes`` of body), and then keeps its connection; its worker
/// counts it pending until then, so no load is held. Past either limit it is
/// closed as above. The client never waits for it. HTTP/1.1 cancels a
/// request only by closing its connection, and each copy's loser then costs
/// both ends a new connection; on a machine the backends share, that is most
/// of what hedging costs (README, Hedging).
public struct HedgePolicy: Sendable, Hashable {
    /// Start another copy after this long without a response head; `nil`: never.
    public var after: Duration?
    /// Most copies of one request for timed hedging, the first included.
    public var maxCopies: Int
    /// Most copies `X-Balancer-Replicas` may ask for; 1 forbids the header.
    public var maxReplicas: Int
    /// Copies per 100 requests that could be hedged, at most.
    public var budgetPercent: Int
    /// When above 0, the delay is this percentile of the pool's recent
    /// response times, at least `after` (which may then be `nil`).
    public var afterPercentile: Int
    /// How long a losing copy may go on to finish, its response thrown away,
    /// so that its connection is kept (``ForwardStop``); `nil`: its
    /// connection is closed at once and replaced.
    public var loserFinish: Duration?

    public init(
        after: Duration?,
        maxCopies: Int,
        maxReplicas: Int,
        budgetPercent: Int = 10,
        afterPercentile: Int = 0,
        loserFinish: Duration? = nil
    ) {
        self.after = after
        self.maxCopies = maxCopies
        self.maxReplicas = maxReplicas
        self.budgetPercent = budgetPercent
        self.afterPercentile = afterPercentile
        self.loserFinish = loserFinish
    }

    /// The most response body bytes a losing copy may send while it
    /// finishes (``loserFinish``); past them its connection is closed.
    static let loserFinishBytes = 64 * 1024

    /// Whether requests get timed copies.
    var timed: Bool { after != nil || afterPercentile > 0 }

    /// The delay before a timed copy now, given the pool's estimate of its
    /// `afterPercentile`th percentile; `nil`: no timed copy (none configured,
    /// or no estimate yet and no `after`).
    func delay(estimate: Duration?) -> Duration? {
        guard afterPercentile > 0, let estimate else { return after }
        return max(estimate, after ?? .zero)
    }

    /// The request header that asks for copies at once.
    static let replicasHeader = "x-balancer-replicas"

    /// How to send one request.
    enum Plan: Equatable {
        /// One copy, with the pool's retries.
        case single
        /// `atOnce` copies at once, then (when `timed`) one more after each
        /// delay (``delay(estimate:)``) without a head, up to `maxCopies`.
        case hedged(atOnce: Int, timed: Bool, maxCopies: Int)
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
        if asked > 1 { return .hedged(atOnce: asked, timed: false, maxCopies: asked) }
        if timed, maxCopies > 1 { return .hedged(atOnce: 1, timed: true, maxCopies: maxCopies) }
        return .single
    }
}

extension HedgePolicy {
    /// Allowed values, shared by the top-level `upstream_hedge_*` keys and a
    /// pool's `hedge` object.
    static let afterRange: ClosedRange<Int64> = 0...3_600_000
    static let copiesRange: ClosedRange<Int> = 1...16
    static let budgetRange: ClosedRange<Int> = 1...100
    static let percentileRange: ClosedRange<Int> = 0...99

    /// The fields of a pool's `hedge` object in the config file: `after_ms`
    /// (0: no timed copies unless `after_percentile`), `max`, `max_replicas`,
    /// `budget_percent`, `after_percentile` (0: off), `loser_finish_ms` (0:
    /// a loser's connection is closed at once). A field left out has its
    /// top-level key's default.
    static let keys: [ObjectKey<HedgePolicy>] = [
        .milliseconds("after_ms", \.after, range: afterRange),
        .int("max", \.maxCopies, range: copiesRange),
        .int("max_replicas", \.maxReplicas, range: copiesRange),
        .int("budget_percent", \.budgetPercent, range: budgetRange),
        .int("after_percentile", \.afterPercentile, range: percentileRange),
        .milliseconds("loser_finish_ms", \.loserFinish, range: afterRange),
    ]
}

extension ServerConfiguration {
    /// The default pool's hedging settings.
    public var upstreamHedging: HedgePolicy {
        HedgePolicy(
            after: .milliseconds(orNone: upstreamHedgeAfterMilliseconds),
            maxCopies: upstreamHedgeMax,
            maxReplicas: upstreamMaxReplicas,
            budgetPercent: upstreamHedgeBudgetPercent,
            afterPercentile: upstreamHedgeAfterPercentile,
            loserFinish: .milliseconds(orNone: upstreamHedgeLoserFinishMilliseconds)
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
    /// Timed copies not sent: the original's backend was expected to answer
    /// within another delay, or no other backend sooner (``ResponseTimes``).
    var declined = 0
    /// Copies due that the budget did not allow.
    var overBudget = 0
    /// Losers that finished their response (thrown away) and kept their
    /// connection (``HedgePolicy/loserFinish``).
    var losersFinished = 0

    init(copies: Int) { winsByCopy = Array(repeating: 0, count: copies) }

    /// The figures, `delay`: the delay before a timed copy now (`null`: none),
    /// and `waiting`: copies waiting for a spare worker now.
    func json(delay: Duration?, waiting: Int) -> JSONValue {
        .object(
            JSONObject([
                ("delay_us", delay.map { JSONValue($0.microseconds) } ?? .null),
                ("waiting_copies", JSONValue(waiting)),
                ("hedged_requests", JSONValue(hedgedRequests)),
                ("copies_sent", JSONValue(copiesSent)),
                ("wins_by_copy", .array(winsByCopy.map { JSONValue($0) })),
                ("cancelled_losers", JSONValue(cancelledLosers)),
                ("skipped", JSONValue(skipped)),
                ("declined", JSONValue(declined)),
                ("over_budget", JSONValue(overBudget)),
                ("losers_finished", JSONValue(losersFinished)),
            ])
        )
    }
}

/// A running estimate of one quantile of a pool's recent response times, by
/// frugal streaming: a sample above the estimate raises it by `quantile`
/// steps, one below lowers it by `1 - quantile` steps, so it settles where
/// that fraction of the samples falls below it. A step is 5% of the estimate:
/// it follows a tenfold rise within about fifty samples above it, and a
/// tenfold fall (at the 95th percentile) within about a thousand.
final class QuantileEstimate: Sendable {
    private let quantile: Double
    /// The estimate in nanoseconds; 0 before the first sample.
    private let nanoseconds = Atomic<Int64>(0)

    init(quantile: Double) { self.quantile = quantile }

    var estimate: Duration? {
        let value = nanoseconds.load(ordering: .relaxed)
        return value > 0 ? .nanoseconds(value) : nil
    }

    func record(_ sample: Duration) {
        let sample = max(Int64(sample / .nanoseconds(1)), 1)
        var current = nanoseconds.load(ordering: .relaxed)
        while true {
            let next: Int64
            if current == 0 {
                next = sample
            } else if current < sample {
                next = current + max(Int64(Double(current) * 0.05 * quantile), 1)
            } else {
                next = max(current - max(Int64(Double(current) * 0.05 * (1 - quantile)), 1), 1)
            }
            let (exchanged, original) = nanoseconds.compareExchange(expected: current, desired: next, ordering: .relaxed)
            if exchanged { return }
            current = original
        }
    }
}

/// One backend's recent response times (from sending a request to its
/// response head), for the one question hedging asks of a request that has
/// waited `t` for its head: how much longer can it be expected to wait? That
/// is the mean residual life, E[T - t | T > t].
///
/// A copy is worth its cost only where that wait is long: when the backend
/// usually answers within another delay, a copy sent now would arrive about
/// when the original does (a busy backend's ordinary tail), so none is sent;
/// a request on a backend that is slow, or stuck past every time recorded
/// (no estimate), is copied. A backend's mean (the wait at `t` = 0) also
/// tells where a copy can be expected to answer sooner.
///
/// A request stopped before its head (a hedge's loser) says only that its
/// time was longer than its wait: it is kept as censored, and the estimate
/// is Kaplan-Meier's, so cutting a slow backend's requests short does not
/// make it look fast. What lies past the last time recorded (requests that
/// were all cut) is extrapolated at the rate heads were still arriving just
/// before it: the hazard over the octave up to the last head (heads per unit
/// of time at risk there), as a constant-hazard tail, whose mean residual is
/// its inverse, at most four times the last time recorded. Hedging cuts a
/// slow backend's requests at about one delay, and without this its tail
/// would look like nothing but that cut: a backend whose times are
/// exponential, mean 20 ms, cut at 12 ms, is expected to take about 20 ms
/// more, not 0. There is no rate to go on when heads had stopped coming
/// before the cut (more than an octave before it, or too few in that octave:
/// the slow requests are slower than anything seen), or came at under half
/// the rate of the octave before (a fast mode with a stuck one beyond it);
/// then, when more than half of what is left past a wait lies there, the
/// wait is unknown (`nil`): a backend whose every slow request is cut is not
/// taken for a fast one. With less
/// than half there, that part counts as ending at the last time recorded (a
/// lower bound, as Efron closes the estimate). A request that has waited past
/// every record has an unknown wait.
///
/// Kept as histograms in quarter-octave buckets (each about 19% wider than
/// the one before), halved every ``window`` samples so they follow the
/// backend as it changes.
final class ResponseTimes: Sendable {
    /// Samples between two halvings of every count.
    static let window = 1024
    /// Buckets up to 2^32 µs (about 70 minutes); longer times share the last.
    private static let bucketCount = 120

    private struct Histogram {
        /// Requests whose head came, by the bucket of their time.
        var heads = [Int](repeating: 0, count: ResponseTimes.bucketCount)
        /// Requests stopped before their head, by the bucket of their wait.
        var stops = [Int](repeating: 0, count: ResponseTimes.bucketCount)
        var total = 0

        mutating func add(_ bucket: Int, stopped: Bool) {
            if stopped { stops[bucket] += 1 } else { heads[bucket] += 1 }
            total += 1
            guard total >= ResponseTimes.window else { return }
            total = 0
            for index in heads.indices {
                heads[index] /= 2
                stops[index] /= 2
                total += heads[index] + stops[index]
            }
        }
    }

    private let histogram = Mutex(Histogram())

    init() {}

    /// Bucket 4e + q holds [2^e (1 + q/4), 2^e (1 + (q + 1)/4)) µs; times
    /// under 4 µs share the first.
    private static func bucket(_ duration: Duration) -> Int {
        let value = UInt64(min(max(duration / .microseconds(1), 4), 1e15))
        let octave = UInt64.bitWidth - 1 - value.leadingZeroBitCount
        let quarter = Int((value >> (octave - 2)) & 3)
        return min(4 * (octave - 2) + quarter, bucketCount - 1)
    }

    /// A bucket's middle, in microseconds: the time its samples stand for.
    private static func middle(_ bucket: Int) -> Double {
        Double(UInt64(1) << (bucket / 4 + 2)) * (1.125 + 0.25 * Double(bucket % 4))
    }

    /// A bucket's width, in microseconds.
    private static func width(_ bucket: Int) -> Double { Double(UInt64(1) << (bucket / 4 + 2)) / 4 }

    /// Heads needed in the octave up to the last head to extrapolate past it.
    static let tailHeads = 8

    /// A response head arrived `time` after its request was sent.
    func record(_ time: Duration) {
        let bucket = Self.bucket(time)
        histogram.withLock { $0.add(bucket, stopped: false) }
    }

    /// A request was stopped `waited` after it was sent, before its head.
    /// Returns how much longer it could be expected to have taken (`nil`:
    /// unknown).
    @discardableResult
    func recordStopped(after waited: Duration) -> Duration? {
        let rest = expectedWait(after: waited)
        let bucket = Self.bucket(waited)
        histogram.withLock { $0.add(bucket, stopped: true) }
        return rest
    }

    /// How much longer a request that has waited `waited` can be expected to
    /// wait; `nil` when nothing is known past `waited` (nothing is recorded
    /// past it, or only stops with no rate to extrapolate).
    func expectedWait(after waited: Duration) -> Duration? {
        let elapsed = max(waited / .microseconds(1), 0)
        var first = Self.bucket(waited)
        if Self.middle(first) <= elapsed { first += 1 }
        let microseconds: Double? = histogram.withLock { histogram in
            // The last bucket with a record, and the requests that reached `first`.
            guard let end = (first..<Self.bucketCount).last(where: { histogram.heads[$0] + histogram.stops[$0] > 0 })
            else { return nil }
            var reached = 0
            for bucket in first...end { reached += histogram.heads[bucket] + histogram.stops[bucket] }
            // Kaplan-Meier: the share still waiting falls at each bucket by its heads over those at risk.
            var atRisk = reached
            var waiting = 1.0
            var mean = 0.0
            for bucket in first...end {
                let heads = histogram.heads[bucket]
                if heads > 0 {
                    let ending = waiting * Double(heads) / Double(atRisk)
                    mean += ending * (Self.middle(bucket) - elapsed)
                    waiting -= ending
                }
                atRisk -= heads + histogram.stops[bucket]
            }
            let last = Self.middle(end) - elapsed
            // Left waiting past the last time recorded: only stops were seen there.
            if let rest = Self.tailMean(histogram, end: end) { return mean + waiting * (last + rest) }
            guard waiting <= 0.5 else { return nil }
            return mean + waiting * last
        }
        return microseconds.map { .microseconds($0) }
    }

    /// The mean time past bucket `end` (the last recorded) of a request still
    /// waiting there, in microseconds, as a constant hazard: the rate heads
    /// came in the octave up to the last head (heads per microsecond at risk,
    /// the stops past it counted at risk until they stopped). `nil` when the
    /// last head is more than an octave before `end`, with fewer than
    /// ``tailHeads`` heads in that octave, or when that rate is under half
    /// the octave before's (a falling hazard, as of a fast mode with a stuck
    /// one beyond it: no constant rate to go on). At most four times the
    /// last time recorded.
    private static func tailMean(_ histogram: Histogram, end: Int) -> Double? {
        // Heads must have kept coming to within an octave of the last record.
        guard let lastHead = (0...end).last(where: { histogram.heads[$0] > 0 }), end - lastHead <= 4 else {
            return nil
        }
        // Heads and time at risk in one octave, given the requests that ended past it.
        func octave(_ top: Int, later: inout Int) -> (heads: Int, exposure: Double) {
            var heads = 0
            var exposure = 0.0
            for bucket in stride(from: top, through: max(top - 3, 0), by: -1) {
                let ended = histogram.heads[bucket] + histogram.stops[bucket]
                heads += histogram.heads[bucket]
                exposure += (Double(later) + Double(ended) / 2) * width(bucket)
                later += ended
            }
            return (heads, exposure)
        }
        // The requests that ended past the last head; its stops were at risk
        // from the last head until they stopped.
        var later = 0
        var beyond = 0.0
        for bucket in stride(from: end, to: lastHead, by: -1) {
            later += histogram.heads[bucket] + histogram.stops[bucket]
            beyond += Double(histogram.stops[bucket]) * (middle(bucket) - middle(lastHead))
        }
        var last = octave(lastHead, later: &later)
        last.exposure += beyond
        guard last.heads >= tailHeads, last.exposure > 0 else { return nil }
        if lastHead >= 4 {
            let before = octave(lastHead - 4, later: &later)
            if before.heads >= tailHeads, before.exposure > 0,
                Double(last.heads) / last.exposure < Double(before.heads) / before.exposure / 2
            {
                return nil
            }
        }
        return min(last.exposure / Double(last.heads), 4 * middle(end))
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
    func deposit() { add(percent) }

    /// Gives back a copy's worth that was not used.
    func refund() { add(100) }

    /// Adds `amount` hundredths of a copy, up to the burst.
    private func add(_ amount: Int) {
        var current = tokens.load(ordering: .relaxed)
        while current < Self.burst * 100 {
            let next = min(current + amount, Self.burst * 100)
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
}

/// One hedged request's copies: who won, which workers they run on, how to
/// stop them, and when the next one is due. Shared by the request's own task
/// (which launches the first copy and any retry, and decides the outcome from
/// the copies' ends), the copies (run by the balancer, which reports their
/// ends) and the pool's ``HedgeTimer``.
final class HedgeRace: Sendable {
    /// What a copy that lost the race throws instead of sending or writing its head.
    struct Lost: Error {}

    /// How a copy ended, as the request's task learns it.
    struct End: Sendable {
        let id: Int
        /// A copy on spare capacity (not the first, not a retry).
        let spare: Bool
        let receipt: Receipt<ForwardResult>?
        let error: (any Error)?
    }

    /// How a live copy is stopped when another wins. Before it is on a
    /// worker, through the balancer (a ``Cancellation``). Once on a worker,
    /// by closing its upstream connection (``ForwardStop``), at once or, for
    /// a loser that may finish, at its deadline: its operation then ends as
    /// a failure (or, finished in time, a success), without the cancellation
    /// that would make the balancer retire the worker's task and start another.
    private enum Stopper {
        case cancellation(Cancellation)
        case forward(ForwardStop)

        /// `lettingFinish`: a loser of a won race, which may finish
        /// (``HedgePolicy/loserFinish``); otherwise its connection closes now.
        func stop(lettingFinish: Bool = false) {
            switch self {
            case .cancellation(let cancellation): cancellation.cancel()
            case .forward(let forward): lettingFinish ? forward.stopLettingFinish() : forward.stop()
            }
        }
    }

    /// A copy that started: on which worker, its backend's response times,
    /// and when it was sent.
    private struct Started {
        let id: Int
        let worker: Int
        let times: ResponseTimes?
        let at: ContinuousClock.Instant
    }

    private struct State {
        /// The copy that took the client (by id), once one has.
        var winner: Int?
        /// The client went away, or the request's task has its outcome: no
        /// copy starts or wins any more.
        var closed = false
        var nextID = 0
        /// Live copies, by id, until their end is reported.
        var live: [(id: Int, stopper: Stopper)] = []
        /// Launched copies not yet on a worker.
        var unstarted: [Int] = []
        /// Unstarted copies stopped by ``withdrawWaiting()``: they must not start.
        var withdrawn: [Int] = []
        /// When the latest copy launched by the request's task (the first, or a
        /// retry) started on its worker: its response timeout runs from then.
        var tryStart: ContinuousClock.Instant?
        /// The copies that started, in order: a copy's rank is its place here.
        var started: [Started] = []
        /// Copies on spare capacity that started.
        var hedgesStarted = 0
        /// Copies still live when another won.
        var losers = 0
        /// Copies launched whose end the request's task has not taken yet.
        var inFlight = 0
        /// Copies asked for at once still to launch, each when the one before it starts.
        var copiesDue: Int
        /// No more timed copies (the budget said no).
        var timedDone = false
        /// The next timed copy is due `after` past this: when the latest copy
        /// started, or a copy found no room.
        var since: ContinuousClock.Instant?
        /// Ends of copies not yet taken, and the request's task waiting for one.
        var ends: [End] = []
        var waiter: CheckedContinuation<End, Never>?
    }

    private let state: Mutex<State>
    let after: Duration?
    let maxCopies: Int
    /// Launches one more copy on spare capacity (the pool's, which knows the
    /// request); `timed`: due after a delay, not asked for at once.
    let spawn: @Sendable (_ race: HedgeRace, _ timed: Bool) -> Void

    init(atOnce: Int, after: Duration?, maxCopies: Int, spawn: @escaping @Sendable (HedgeRace, Bool) -> Void) {
        state = Mutex(State(copiesDue: atOnce - 1))
        self.after = after
        self.maxCopies = maxCopies
        self.spawn = spawn
    }

    var winner: Int? { state.withLock { $0.winner } }
    /// The winner's rank (0 for the copy that started first).
    var winnerRank: Int? {
        state.withLock { state in state.winner.flatMap { winner in state.started.firstIndex { $0.id == winner } } }
    }
    var losersCancelled: Int { state.withLock { $0.losers } }
    var hedgesStarted: Int { state.withLock { $0.hedgesStarted } }
    /// Workers of the copies that started so far.
    var workers: [Int] { state.withLock { $0.started.map(\.worker) } }

    /// Registers a new copy, stopped through `cancellation` until it is on a
    /// worker, and returns its id, or nil when it is too late (a copy won, or
    /// the race is closed). A copy on spare capacity goes only while another
    /// is live. Submit it only after this returns: a stop before then reaches
    /// it through `cancellation` as soon as it is submitted.
    private func launch(spare: Bool, _ cancellation: Cancellation) -> Int? {
        state.withLock { state in
            guard !state.closed, state.winner == nil, !spare || state.inFlight > 0 else { return nil }
            let id = state.nextID
            state.nextID += 1
            state.inFlight += 1
            state.unstarted.append(id)
            state.live.append((id, .cancellation(cancellation)))
            return id
        }
    }

    /// Registers the first copy or a retry, whose end comes through ``report(_:)``.
    func launchInline(_ cancellation: Cancellation) -> Int? {
        launch(spare: false, cancellation)
    }

    /// Registers a copy on spare capacity, whose end comes through ``report(_:)``.
    func launchSpare(_ cancellation: Cancellation) -> Int? {
        launch(spare: true, cancellation)
    }

    /// Copy `id` is on worker `worker` (of a backend with response times
    /// `times`) and about to send, stopped from now on by `stop`; false (send
    /// nothing) when another copy has already won. Launches the next copy
    /// asked for at once, if any.
    func started(_ id: Int, worker: Int, times: ResponseTimes?, spare: Bool, stop: ForwardStop) -> Bool {
        let (go, more): (Bool, Bool) = state.withLock { state in
            state.unstarted.removeAll { $0 == id }
            guard !state.closed, state.winner == nil, !state.withdrawn.contains(id) else { return (false, false) }
            if let index = state.live.firstIndex(where: { $0.id == id }) { state.live[index].stopper = .forward(stop) }
            if !spare { state.tryStart = .now }
            let now = ContinuousClock.now
            state.started.append(Started(id: id, worker: worker, times: times, at: now))
            if spare { state.hedgesStarted += 1 }
            state.since = now
            guard state.copiesDue > 0 else { return (true, false) }
            state.copiesDue -= 1
            return (true, true)
        }
        if more { spawn(self, false) }
        return go
    }

    /// Whether a timed copy is due at `now`: no head yet, a copy live and on
    /// its worker for `after`, none waiting for one, and fewer than `maxCopies`.
    func due(at now: ContinuousClock.Instant) -> Bool {
        guard let after else { return false }
        return state.withLock { state in
            guard !state.closed, state.winner == nil, !state.timedDone, state.inFlight > 0, state.unstarted.isEmpty,
                1 + state.hedgesStarted < maxCopies, let since = state.since
            else { return false }
            return since + after <= now
        }
    }

    /// How much longer the request can be expected to wait for a head at
    /// `now`: the least expected wait of its live copies that started, each
    /// by its backend's response times; `nil` when nothing is known of one.
    func expectedWait(at now: ContinuousClock.Instant) -> Duration? {
        let sent: [Started] = state.withLock { state in
            state.started.filter { copy in state.live.contains { $0.id == copy.id } }
        }
        var least: Duration?
        for copy in sent {
            guard let wait = copy.times?.expectedWait(after: now - copy.at) else { return nil }
            least = min(least ?? wait, wait)
        }
        return least
    }

    /// No more timed copies for this request: the budget refused one, or no
    /// other backend could take one.
    func stopTimed() { state.withLock { $0.timedDone = true } }

    /// When the latest copy launched by the request's task started on its worker
    /// (set before any copy on spare capacity launches).
    var tryStart: ContinuousClock.Instant? { state.withLock { $0.tryStart } }

    /// When no copy has won and every live copy is still waiting for a
    /// worker, stops them all (they will not start): nothing is left that
    /// could answer, so the request's task need not wait for their patience
    /// to run out before it retries or answers. Their ends are still
    /// reported, as `cancelled` or ``Lost``.
    func withdrawWaiting() {
        let stopped: [Stopper]? = state.withLock { state in
            guard state.winner == nil, state.live.allSatisfy({ copy in state.unstarted.contains(copy.id) }) else {
                return nil
            }
            let fresh = state.live.filter { copy in !state.withdrawn.contains(copy.id) }
            guard !fresh.isEmpty else { return nil }
            state.withdrawn.append(contentsOf: fresh.map(\.id))
            return fresh.map(\.stopper)
        }
        for copy in stopped ?? [] { copy.stop() }
    }

    /// A copy on spare capacity found no worker in time: the next one is due `after` from now.
    func restartDelay() { state.withLock { $0.since = .now } }

    /// Copy `id` has a response head: it wins if nobody did yet (and the race
    /// is open), and every other live copy is stopped. Returns whether it won.
    func claim(_ id: Int) -> Bool {
        let losers: [Stopper]? = state.withLock { state in
            guard state.winner == nil, !state.closed else { return nil }
            state.winner = id
            let others = state.live.filter { $0.id != id }
            state.losers = others.filter { loser in state.started.contains { $0.id == loser.id } }.count
            return others.map(\.stopper)
        }
        guard let losers else { return false }
        for loser in losers { loser.stop(lettingFinish: true) }
        return true
    }

    /// Copy `id` ended; returns whether it never started.
    private func ended(_ id: Int, _ state: inout State) -> Bool {
        state.live.removeAll { $0.id == id }
        let count = state.unstarted.count
        state.unstarted.removeAll { $0 == id }
        return state.unstarted.count < count
    }

    /// A copy reports its end; returns whether it never started.
    func report(_ end: End) -> Bool {
        let (neverStarted, waiter): (Bool, CheckedContinuation<End, Never>?) = state.withLock { state in
            let neverStarted = ended(end.id, &state)
            if let waiter = state.waiter {
                state.waiter = nil
                state.inFlight -= 1
                return (neverStarted, waiter)
            }
            state.ends.append(end)
            return (neverStarted, nil)
        }
        waiter?.resume(returning: end)
        return neverStarted
    }

    /// The next end of a copy; call only while ``inFlight`` is above 0.
    func nextEnd() async -> End {
        await withCheckedContinuation { continuation in
            let ready: End? = state.withLock { state in
                if !state.ends.isEmpty {
                    state.inFlight -= 1
                    return state.ends.removeFirst()
                }
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// Copies launched whose end the request's task has not taken yet.
    var inFlight: Int { state.withLock { $0.inFlight } }

    /// No copy starts or wins from now on; every live one is stopped. Returns
    /// the winner if one claimed the client before.
    @discardableResult
    func close() -> Int? {
        let (winner, live): (Int?, [Stopper]) = state.withLock { state in
            if let winner = state.winner { return (winner, []) }
            state.closed = true
            return (nil, state.live.map(\.stopper))
        }
        for copy in live { copy.stop() }
        return winner
    }

    /// The client went away: no copy starts or wins from now on, and every
    /// live one, the winner's included, is stopped at once.
    func abandon() {
        let live: [Stopper] = state.withLock { state in
            state.closed = true
            return state.live.map(\.stopper)
        }
        for copy in live { copy.stop() }
    }
}

extension HedgeRace.End {
    /// The end of copy `id` as the balancer reported it.
    init(id: Int, spare: Bool, _ result: Result<Receipt<ForwardResult>, any Error>) {
        switch result {
        case .success(let receipt): self.init(id: id, spare: spare, receipt: receipt, error: nil)
        case .failure(let error): self.init(id: id, spare: spare, receipt: nil, error: error)
        }
    }
}

/// A client writer that only stands between the response head and `client`:
/// the body, the end and flushes go straight through.
protocol HeadInterceptingWriter: ClientResponseWriting {
    associatedtype Client: ClientResponseWriting
    var client: Client { get }
}

extension HeadInterceptingWriter {
    func writeBody(_ buffer: ByteBuffer) async throws { try await client.writeBody(buffer) }

    func end(trailers: HTTPHeaders?) async throws { try await client.end(trailers: trailers) }

    func flush() async throws { try await client.flush() }
}

/// The client as one copy sees it: the response head goes through only for
/// the copy that wins the race. A later one throws, which closes its upstream
/// connection (the forwarder treats it as a client that went away), unless
/// it may finish (`discard`): then its response is thrown away, up to
/// ``HedgePolicy/loserFinishBytes`` of body, so its connection is kept.
struct HedgeCopyWriter<Client: ClientResponseWriting>: HeadInterceptingWriter {
    let race: HedgeRace
    let id: Int
    let client: Client
    let timing: CopyTiming?
    let discard: LoserDiscard?

    var headWritten: Bool { race.winner == id && client.headWritten }

    func writeHead(_ head: HTTPResponseHead) async throws {
        timing?.headArrived()
        guard race.claim(id) else {
            // Thrown away only when another copy won, not when the race closed without a winner.
            guard let discard, race.winner != nil else { throw HedgeRace.Lost() }
            discard.begin()
            return
        }
        try await client.writeHead(head)
    }

    func writeBody(_ buffer: ByteBuffer) async throws {
        if let discard, discard.active {
            guard discard.take(buffer.readableBytes) else { throw HedgeRace.Lost() }
            return
        }
        try await client.writeBody(buffer)
    }

    func end(trailers: HTTPHeaders?) async throws {
        if let discard, discard.active { return }
        try await client.end(trailers: trailers)
    }

    func flush() async throws {
        if let discard, discard.active { return }
        try await client.flush()
    }
}

/// A losing copy's response as it is thrown away while the copy finishes.
final class LoserDiscard: Sendable {
    private let discarding = Atomic<Bool>(false)
    private let bytes = Atomic<Int>(0)

    /// The copy lost with its response head: what follows is thrown away.
    func begin() { discarding.store(true, ordering: .relaxed) }

    var active: Bool { discarding.load(ordering: .relaxed) }

    /// Throws away `count` more body bytes; false past ``HedgePolicy/loserFinishBytes``.
    func take(_ count: Int) -> Bool {
        bytes.add(count, ordering: .relaxed).newValue <= HedgePolicy.loserFinishBytes
    }
}

/// One copy's time to its response head, as a sample of its backend's
/// ``ResponseTimes``: the head's arrival, winner's or loser's, or, for a copy
/// stopped before its head, the stop (a lower bound).
final class CopyTiming: Sendable {
    private let times: ResponseTimes
    private let sent = ContinuousClock.now
    private let arrived = Atomic<Bool>(false)

    /// A copy sent now to a backend with response times `times`.
    init(_ times: ResponseTimes) { self.times = times }

    func headArrived() {
        arrived.store(true, ordering: .relaxed)
        times.record(.now - sent)
    }

    /// The copy was stopped (another won); counts only if its head had not
    /// arrived. Returns how much longer its backend can be expected to work
    /// on it: as the response times say, or when they cannot, as long again
    /// as it has waited; `nil` when the head had arrived.
    func stopped() -> Duration? {
        guard !arrived.load(ordering: .relaxed) else { return nil }
        let waited = ContinuousClock.now - sent
        return times.recordStopped(after: waited) ?? waited
    }
}

/// The client as a pool with `after_percentile` sees it: the time from the
/// request's start to the response head that goes to the client is one
/// sample of the pool's response times. One per request: a hedged request's
/// losers never write a head, and its winner's sample counts from the
/// request's start, not from its own.
struct HeadTimingWriter<Client: ClientResponseWriting>: HeadInterceptingWriter {
    let estimate: QuantileEstimate
    let start: ContinuousClock.Instant
    let client: Client

    var headWritten: Bool { client.headWritten }

    func writeHead(_ head: HTTPResponseHead) async throws {
        estimate.record(.now - start)
        try await client.writeHead(head)
    }
}

/// Starts the timed copies of a pool's hedged requests: one task that wakes
/// every quarter of the shortest delay among the watched requests (at least
/// every millisecond) while any request is watched, and launches a copy for
/// each that is due. A request pays a locked insert and remove for it, not a
/// timer of its own; a copy goes between its request's delay and 1.25 times
/// that after the one before it started.
final class HedgeTimer: Sendable {
    private struct State {
        /// Watched requests, with when they began to be.
        var races: [ObjectIdentifier: (race: HedgeRace, since: ContinuousClock.Instant)] = [:]
        var running = false
        /// The next sleep: a quarter of the shortest delay watched at the last tick (or watch).
        var tick = Duration.milliseconds(1)
    }

    private let state = Mutex(State())

    func watch(_ race: HedgeRace) {
        let now = ContinuousClock.now
        let start = state.withLock { state in
            state.races[ObjectIdentifier(race)] = (race, now)
            defer { state.running = true }
            if let after = race.after {
                let tick = Self.tick(after)
                state.tick = state.running ? min(state.tick, tick) : tick
            }
            return !state.running
        }
        if start { Task.detached { await self.run() } }
    }

    func unwatch(_ race: HedgeRace) {
        _ = state.withLock { $0.races.removeValue(forKey: ObjectIdentifier(race)) }
    }

    /// How long the timer sleeps while a request with delay `after` is watched.
    static func tick(_ after: Duration) -> Duration { max(after / 4, .milliseconds(1)) }

    /// Ticks until no request is watched.
    private func run() async {
        while true {
            try? await Task.sleep(for: state.withLock { $0.tick })
            let now = ContinuousClock.now
            // Only a request watched for a whole delay can be due: the others
            // are passed over without their locks (most end well before).
            let candidates: [HedgeRace]? = state.withLock { state in
                guard !state.races.isEmpty else {
                    state.running = false
                    return nil
                }
                var candidates: [HedgeRace] = []
                var shortest: Duration?
                for (race, since) in state.races.values {
                    guard let after = race.after else { continue }
                    if since + after <= now { candidates.append(race) }
                    shortest = min(shortest ?? after, after)
                }
                state.tick = Self.tick(shortest ?? .milliseconds(4))
                return candidates
            }
            guard let candidates else { return }
            for race in candidates where race.due(at: now) { race.spawn(race, true) }
        }
    }
}

extension UpstreamPool {
    /// Sends `head` as `plan` says, with copies on other backends; the first
    /// response head wins. See ``HedgePolicy``.
    ///
    /// Every copy is handed to the balancer without a task of its own (the
    /// first and any retry as an unhedged request goes, the ones due on spare
    /// capacity with
    /// ``Balancer/submitOnWorker(ifRoomAmong:waitingAtMost:cancellation:_:onEnd:)``),
    /// and this task waits for their ends; so a request answered before
    /// `after` costs little more than an unhedged one.
    func hedge<Body: AsyncSequence & Sendable>(
        _ head: HTTPRequestHead,
        body: Body,
        atOnce: Int,
        timed: Bool,
        maxCopies: Int,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) async -> Outcome where Body.Element == ByteBuffer {
        hedgeBudget.deposit()
        let delay = timed ? hedging.delay(estimate: hedgeLatency?.estimate) : nil
        let race = HedgeRace(atOnce: atOnce, after: delay, maxCopies: maxCopies) { race, timed in
            self.spawnCopy(of: race, timed: timed, head, body: body, forwarding: forwarding, to: writer)
        }
        let timer = delay == nil ? nil : hedgeTimer
        timer?.watch(race)
        defer { timer?.unwatch(race) }

        return await withTaskCancellationHandler {
            var retriesLeft = retries
            var lastError: UpstreamError?
            var outcome: Outcome?
            var end = await runInline(race, head, body: body, forwarding: forwarding, to: writer)
            while true {
                if race.winner == end.id {
                    // The winner's exchange is over: its response went out, or broke off
                    // (an error can still be answered if its head never left the writer).
                    outcome = end.receipt.map { forwarded($0) } ?? brokenOff(end.error, writer: writer)
                    break
                }
                var decided: Outcome?
                if let error = end.error, race.winner == nil,
                    !(end.spare && (error is BalancerError || error is HedgeRace.Lost))
                {
                    // (A spare copy the balancer refused found no room in time, or was
                    // withdrawn while it waited: the others go on.)
                    switch error {
                    case let error as UpstreamError where error.kind == .clientAborted:
                        decided = .abort
                    case let error as UpstreamError:
                        lastError = error
                    case BalancerError.cancelled:
                        decided = .abort
                    case BalancerError.unavailable:
                        decided = .failed(lastError.map { .noHealthyBackend(after: $0) } ?? APIError(error))
                    case let error:
                        decided = .failed(APIError(error))
                    }
                }
                // Copies still waiting for a worker would hold up the retry or
                // the error answer for their whole patience: stop them.
                if decided == nil && race.winner == nil && race.inFlight > 0 { race.withdrawWaiting() }
                if decided == nil && race.winner == nil && race.inFlight == 0 {
                    // Every copy failed before a response head: the pool's retry rules.
                    if let lastError, retriesLeft > 0, lastError.isRetryable(method: head.method, bodyReplayable: true) {
                        retriesLeft -= 1
                        countRetry(on: lastError.backend)
                        end = await runInline(race, head, body: body, forwarding: forwarding, to: writer)
                        continue
                    }
                    decided = .failed(lastError.map { APIError($0) } ?? APIError(BalancerError.unavailable))
                }
                // A failure ends the request, unless a copy has taken the client: then its end does.
                if let decided, race.close() == nil {
                    outcome = decided
                    break
                }
                end = await race.nextEnd()
            }
            race.close()
            recordHedge(race: race)
            return outcome ?? .abort
        } onCancel: {
            race.abandon()
        }
    }

    /// Starts the first copy, or a retry, on any worker (as an unhedged
    /// request goes), and returns the next end of any copy of the request.
    /// The copy has no task of its own and reports its end through the race
    /// like the others, so the request's task never waits for it once
    /// another copy has answered: a loser that finishes
    /// (``HedgePolicy/loserFinish``) runs on without holding up the client.
    private func runInline<Body: AsyncSequence & Sendable>(
        _ race: HedgeRace,
        _ head: HTTPRequestHead,
        body: Body,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) async -> HedgeRace.End where Body.Element == ByteBuffer {
        let cancellation = Cancellation()
        guard let id = race.launchInline(cancellation) else {
            return HedgeRace.End(id: -1, spare: false, receipt: nil, error: BalancerError.cancelled)
        }
        let operation = copyOperation(race, id, spare: false, head, body: body, forwarding: forwarding, to: writer)
        balancer.submitOnWorker(cancellation: cancellation, operation) { result in
            _ = race.report(HedgeRace.End(id: id, spare: false, result))
        }
        return await race.nextEnd()
    }

    /// Starts one more copy of `race`'s request on spare capacity: on the
    /// least-loaded worker with room of a backend no other copy uses, waiting
    /// for one (ahead of the backlog) while no copy has answered, at most the
    /// pool's response timeout. Paid from the budget, given back if it never starts.
    ///
    /// A `timed` copy goes only where it can cut the wait: not when the
    /// request's backend can be expected to answer within another delay, and
    /// only to a backend expected to answer sooner than that (see
    /// ``ResponseTimes``); otherwise it is declined and due again a delay later.
    private func spawnCopy<Body: AsyncSequence & Sendable>(
        of race: HedgeRace,
        timed: Bool,
        _ head: HTTPRequestHead,
        body: Body,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) where Body.Element == ByteBuffer {
        var within: Duration?
        if timed, let after = race.after {
            within = race.expectedWait(at: .now)
            if let within, within < after {
                decline(race)
                return
            }
        }
        guard hedgeBudget.withdraw() else {
            race.stopTimed()
            hedgeStats.withLock { $0.overBudget += 1 }
            return
        }
        // A later copy starts once the ones before it are on their workers.
        // No other backend in rotation (or a pool of one): no copy, and none later.
        let eligible: @Sendable (Int) -> Bool
        switch spareWorkers(awayFrom: race.workers, answeringWithin: within) {
        case .noOtherBackend:
            hedgeBudget.refund()
            race.stopTimed()
            return
        case .noneSooner:
            hedgeBudget.refund()
            decline(race)
            return
        case .workers(let workers):
            eligible = workers
        }
        // It waits no longer than the request's own copy may wait for its head.
        let timeout = Duration.milliseconds(configuration.responseTimeoutMilliseconds)
        let patience = max(timeout - (ContinuousClock.now - (race.tryStart ?? .now)), .zero)
        let cancellation = Cancellation()
        guard let id = race.launchSpare(cancellation) else {
            hedgeBudget.refund()
            return
        }
        // No task of its own: the balancer calls back with its end (from the
        // worker's task, or its own when it never ran).
        let operation = copyOperation(race, id, spare: true, head, body: body, forwarding: forwarding, to: writer)
        balancer.submitOnWorker(
            ifRoomAmong: eligible, waitingAtMost: patience, cancellation: cancellation, operation
        ) { result in
            let end = HedgeRace.End(id: id, spare: true, result)
            if let error = end.error as? BalancerError, error != .cancelled, race.winner == nil {
                race.restartDelay()
                self.hedgeStats.withLock { $0.skipped += 1 }
            }
            if race.report(end) { self.hedgeBudget.refund() }
        }
    }

    /// A timed copy is not worth sending now: it is due again a delay later.
    private func decline(_ race: HedgeRace) {
        race.restartDelay()
        hedgeStats.withLock { $0.declined += 1 }
    }

    /// What copy `id` runs on its worker: forward, unless another copy won
    /// first. Its head, or its stop when another wins, is a sample of its
    /// backend's response times; at a stop, load is held on its worker for
    /// the rest of the time its backend can be expected to take
    /// (``Balancer/holdLoad(on:until:)``).
    private func copyOperation<Body: AsyncSequence & Sendable>(
        _ race: HedgeRace,
        _ id: Int,
        spare: Bool,
        _ head: HTTPRequestHead,
        body: Body,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) -> @Sendable (Int) async throws -> ForwardResult where Body.Element == ByteBuffer {
        let finish = hedging.loserFinish
        return { worker in
            let times = self.responseTimes(ofWorker: worker)
            let stop = ForwardStop(finishWithin: finish)
            guard race.started(id, worker: worker, times: times, spare: spare, stop: stop) else { throw HedgeRace.Lost() }
            let timing = times.map { CopyTiming($0) }
            let copy = HedgeCopyWriter(
                race: race, id: id, client: writer, timing: timing, discard: finish == nil ? nil : LoserDiscard())
            do {
                let result = try await self.forward(on: worker, head, body: body, forwarding: forwarding, to: copy, stop: stop)
                if result.keptAlive, let winner = race.winner, winner != id {
                    self.hedgeStats.withLock { $0.losersFinished += 1 }
                }
                return result
            } catch let error as UpstreamError where error.kind == .clientAborted {
                // Cut off by another copy's win after it went out: its backend still works on it.
                if let winner = race.winner, winner != id, stop.reachedConnection, let rest = timing?.stopped() {
                    let longest = Duration.milliseconds(self.configuration.responseTimeoutMilliseconds)
                    self.balancer.holdLoad(on: worker, until: .now + min(rest, longest))
                }
                throw error
            }
        }
    }

    /// The outcome of a winning copy that failed: an error answer if its head
    /// never reached the client (the writer still held it), else an abort.
    private func brokenOff(_ error: (any Error)?, writer: some ClientResponseWriting) -> Outcome {
        guard !writer.headWritten, let error = error as? UpstreamError, error.kind != .clientAborted else { return .abort }
        return .failed(APIError(error))
    }

    /// Adds one request's copies to the pool's hedging stats.
    private func recordHedge(race: HedgeRace) {
        let hedgesStarted = race.hedgesStarted
        guard hedgesStarted > 0 else { return }
        let (rank, losers) = (race.winnerRank, race.losersCancelled)
        hedgeStats.withLock { stats in
            stats.hedgedRequests += 1
            stats.copiesSent += hedgesStarted
            stats.cancelledLosers += losers
            if let rank, stats.winsByCopy.indices.contains(rank) {
                stats.winsByCopy[rank] += 1
            }
        }
    }
}

import BalancerCore
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Synchronization

/// An upstream pool: the talk's balancer in front of real backends.
///
/// Each backend gets K workers (K = its connection limit, like HAProxy's
/// per-server `maxconn`); each worker owns one keep-alive connection it uses
/// one request at a time. The workers of the configured backends are
/// interleaved (ties between idle workers alternate backends). A request is the
/// talk's `Request` whose operation is "forward this over my connection", so
/// the heap gives it to the connection with the least pending.
///
/// Failures: a retryable failure (``UpstreamError/Kind/retry``) is tried again
/// on another worker, up to `retries` more times. `max_fails` consecutive
/// failures of a backend eject it for `fail_timeout_ms`, as nginx's
/// `max_fails` and `fail_timeout` do.
///
/// Whether a backend's workers are in the heap is decided in one place,
/// ``BackendEntry/inRotation(now:)``: only when the admin API has it `ready`,
/// its active health check says up, and passive health has not ejected it.
/// Any one of them saying no wins, so the two health mechanisms never fight:
/// an ejection keeps a backend out for its cool-down even while checks pass,
/// and a failing check keeps it out after the ejection ends. Out of rotation,
/// its workers are marked down in the balancer: the request each runs
/// finishes, the one queued behind it (capacity is 1) goes back to the backlog
/// and on to another backend.
///
/// Backends can be drained, made ready, added and removed at runtime (the
/// admin API); it is a swift-service-lifecycle `Service` whose ``run()`` runs
/// the active health checks.
public final class UpstreamPool: Service, Sendable {
    public let configuration: PoolConfiguration
    /// The pool's own balancer; run it in the service group.
    public let balancer: Balancer
    /// When requests are copied to other backends (see ``HedgePolicy``).
    public let hedging: HedgePolicy
    let hedgeStats: Mutex<HedgeStats>
    let hedgeBudget: HedgeBudget
    /// Starts timed copies; `nil` when the pool sends none.
    let hedgeTimer: HedgeTimer?
    /// The percentile of response times that sets the hedge delay, when one does.
    let hedgeLatency: QuantileEstimate?
    private let eventLoopGroup: any EventLoopGroup
    /// Where backends leaving and joining the rotation are logged (with why).
    private let logger: Logger
    /// The default logger: says nothing (`balancer serve` passes its own).
    public static let silentLogger = Logger(label: "balancer.upstream", factory: { _ in SwiftLogNoOpLogHandler() })
    private let upstreamConfiguration: UpstreamConfiguration
    private let names: BackendNames
    private let state: Mutex<State>

    public var name: String { configuration.name }
    /// The `pool` label of this pool's metrics and access-log lines.
    var poolName: PoolName { PoolName(rawValue: configuration.name) }
    /// Further tries after a retryable failure.
    var retries: Int { configuration.retries }

    /// What the admin API set for a backend.
    enum AdminState: String, Sendable {
        /// In rotation when healthy.
        case ready
        /// Out of rotation: finishes what it holds, takes nothing new.
        case draining
        /// Being removed: leaves the pool once its running requests end.
        case removing
    }

    struct BackendEntry: Sendable {
        let backend: Backend
        /// A number for the backend, unique in the pool for its life (hedging
        /// tells backends apart by it).
        let number: Int
        let connections: Int
        var workerIDs: [Int]
        /// Recorded by hedged requests only (see ``ResponseTimes``).
        let responseTimes = ResponseTimes()
        var admin = AdminState.ready
        var passive: PassiveHealth
        /// What the active health check says (up when there is none).
        var healthUp = true
        var checker: HealthChecker?
        var checkerTask: Task<Void, Never>?
        var retries = 0
        var ejections = 0
        /// The failure that caused the last ejection, for the log.
        var lastFailure: String?
        /// Whether the workers were last put in rotation (true) or taken out,
        /// as ``reconcile(_:)`` last applied and logged it.
        var applied = true
        /// Bumped on every change that may move the backend in or out of
        /// rotation; ``reconcile(_:)`` repeats until it applied the latest.
        var generation = 0

        /// The one rule for whether this backend's workers are in the heap.
        func inRotation(now: ContinuousClock.Instant = .now) -> Bool {
            admin == .ready && healthUp && !passive.isEjected(now: now)
        }

        /// Why the backend is out of rotation (the first reason that holds), for the log.
        func outOfRotationReason(now: ContinuousClock.Instant = .now) -> String {
            switch admin {
            case .draining: return "drained through the admin API"
            case .removing: return "being removed through the admin API"
            case .ready: break
            }
            if !healthUp {
                let last = checker?.status.lastCheck.map { $0.failure ?? "ok" } ?? "no check yet"
                return "its health check is failing (last check: \(last))"
            }
            if passive.isEjected(now: now) {
                return "ejected for \(passive.coolDown) after \(passive.maxFailures) failure(s) in a row: \(lastFailure ?? "?")"
            }
            return "out of rotation"
        }
    }

    struct WorkerEntry: Sendable {
        let backend: String
        let connection: UpstreamConnection
        var stats = UpstreamStats()
    }

    private struct State: Sendable {
        /// In the order they were added.
        var backends: [BackendEntry] = []
        var workers: [Int: WorkerEntry] = [:]
        /// The next ``BackendEntry/number``.
        var nextNumber = 0
        /// Set by ``run()``: health checkers of backends added later start at once.
        var running = false
        var stopped = false
        /// Told the ids of a removed backend's workers once they have left the balancer.
        var workersLeft: (@Sendable ([Int]) -> Void)?

        func index(of backend: String) -> Int? { backends.firstIndex { $0.backend.name == backend } }

        /// The index of worker `id`'s backend.
        func index(ofWorker id: Int) -> Int? { workers[id].flatMap { index(of: $0.backend) } }

        /// Takes the next ``BackendEntry/number``.
        mutating func takeNumber() -> Int {
            defer { nextNumber += 1 }
            return nextNumber
        }

        mutating func append(
            _ backend: Backend, number: Int, connections: Int, workerIDs: [Int], passive: PassiveHealth,
            checker: HealthChecker? = nil
        ) {
            backends.append(
                BackendEntry(
                    backend: backend, number: number, connections: connections, workerIDs: workerIDs, passive: passive,
                    checker: checker))
        }
    }

    /// - Parameters:
    ///   - configuration: the pool's backends, health checks and policies.
    ///   - backlog, queueTimeout: the server's, for this pool's balancer.
    ///   - names: backend names taken by every pool (they are unique server-wide).
    ///   - logger: where backends leaving and joining the rotation are logged.
    public init(
        configuration: PoolConfiguration,
        backlog: Int,
        queueTimeout: Duration,
        names: BackendNames = BackendNames(),
        eventLoopGroup: any EventLoopGroup,
        logger: Logger = UpstreamPool.silentLogger
    ) throws {
        precondition(configuration.kind == .upstream, "an UpstreamPool is an upstream pool")
        self.configuration = configuration
        self.eventLoopGroup = eventLoopGroup
        var logger = logger
        logger[metadataKey: "pool"] = "\(configuration.name)"
        self.logger = logger
        self.names = names
        self.upstreamConfiguration = UpstreamConfiguration(
            connectTimeout: .milliseconds(configuration.connectTimeoutMilliseconds),
            responseHeaderTimeout: .milliseconds(configuration.responseTimeoutMilliseconds)
        )
        let backends = try configuration.backends.map { try Backend(name: $0.name, url: $0.url) }
        for backend in backends where !names.reserve(backend.name) {
            throw ConfigurationError("pools: backend name \"\(backend.name)\" is used twice")
        }
        // Worker ids 0..<total, interleaved across backends.
        var owners: [Int] = []
        for round in 0..<(configuration.backends.map(\.connections).max() ?? 0) {
            for (index, backend) in configuration.backends.enumerated() where backend.connections > round {
                owners.append(index)
            }
        }
        var state = State()
        let numbers = backends.map { _ in state.takeNumber() }
        // A backend's workers form one group, named by its number: among idle
        // connections the balancer prefers the backend with the fewest requests in flight.
        self.balancer = Balancer(
            configuration: configuration.balancer(backlog: backlog, queueTimeout: queueTimeout),
            groups: owners.map { numbers[$0] })
        self.hedging = configuration.hedging ?? ServerConfiguration().upstreamHedging
        self.hedgeStats = Mutex(HedgeStats(copies: max(hedging.maxCopies, hedging.maxReplicas)))
        self.hedgeBudget = HedgeBudget(percent: hedging.budgetPercent)
        let hedging = self.hedging
        let latency = hedging.afterPercentile > 0 ? QuantileEstimate(quantile: Double(hedging.afterPercentile) / 100) : nil
        self.hedgeLatency = latency
        self.hedgeTimer = hedging.timed ? HedgeTimer() : nil

        let passive = PassiveHealth(maxFailures: configuration.maxFails, coolDown: .milliseconds(configuration.failTimeoutMilliseconds))
        for (index, backend) in backends.enumerated() {
            state.append(
                backend, number: numbers[index], connections: configuration.backends[index].connections,
                workerIDs: owners.indices.filter { owners[$0] == index }, passive: passive)
        }
        for (worker, owner) in owners.enumerated() {
            state.workers[worker] = WorkerEntry(
                backend: backends[owner].name,
                connection: UpstreamConnection(backend: backends[owner], configuration: upstreamConfiguration, eventLoop: eventLoopGroup.next())
            )
        }
        self.state = Mutex(state)
        for index in backends.indices {
            let checker = makeChecker(for: backends[index])
            self.state.withLock { $0.backends[index].checker = checker }
        }
    }

    // MARK: - Proxying

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
    ///   - writer: the client's side; ``ClientResponseWriting/headWritten`` tells
    ///     whether an error can still be answered.
    public func proxy<Body: AsyncSequence & Sendable>(
        _ head: HTTPRequestHead,
        body: Body,
        replayable: Bool,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) async -> Outcome where Body.Element == ByteBuffer {
        guard let hedgeLatency else {
            return await send(head, body: body, replayable: replayable, forwarding: forwarding, to: writer)
        }
        let timed = HeadTimingWriter(estimate: hedgeLatency, start: .now, client: writer)
        return await send(head, body: body, replayable: replayable, forwarding: forwarding, to: timed)
    }

    /// ``proxy(_:body:replayable:forwarding:to:)`` as the hedging policy plans it.
    private func send<Body: AsyncSequence & Sendable>(
        _ head: HTTPRequestHead,
        body: Body,
        replayable: Bool,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting
    ) async -> Outcome where Body.Element == ByteBuffer {
        var planned = head
        switch hedging.plan(for: &planned, replayable: replayable) {
        case .single: break
        case .hedged(let atOnce, let timed, let maxCopies):
            return await hedge(
                planned, body: body, atOnce: atOnce, timed: timed, maxCopies: maxCopies, forwarding: forwarding,
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
        state.withLock { state in
            if let index = state.index(of: backend) { state.backends[index].retries += 1 }
        }
    }

    /// Which workers a copy of a request may run on.
    enum SpareWorkers {
        /// No backend in rotation is free of the request's other copies.
        case noOtherBackend
        /// There are such backends, but none can be expected to answer sooner.
        case noneSooner
        /// Whether worker `id` may take the copy: an array lookup, since the
        /// balancer calls it for every worker each time it chooses.
        case workers(@Sendable (_ id: Int) -> Bool)
    }

    /// Which workers a copy of a request may run on: those of the backends in
    /// rotation that none of `taken` (the workers of its other copies)
    /// belongs to and, with `within`, whose mean response time (when known)
    /// is shorter than that.
    func spareWorkers(awayFrom taken: [Int], answeringWithin within: Duration? = nil) -> SpareWorkers {
        // Entries are read in place (copying one, a dozen fields, per worker
        // was most of the cost of starting a copy), and the estimates are
        // worked out after the lock.
        let (candidates, workerCount) = state.withLock { state -> ([(ResponseTimes, [Int])], Int) in
            let takenBackends = taken.compactMap { state.index(ofWorker: $0) }
            let now = ContinuousClock.now
            let candidates = state.backends.indices.filter { index in
                !takenBackends.contains(index) && state.backends[index].inRotation(now: now)
            }.map { (state.backends[$0].responseTimes, state.backends[$0].workerIDs) }
            return (candidates, (state.workers.keys.max() ?? -1) + 1)
        }
        guard !candidates.isEmpty else { return .noOtherBackend }
        var allowed = Array(repeating: false, count: workerCount)
        for (times, workers) in candidates {
            if let within, let mean = times.expectedWait(after: .zero), mean >= within { continue }
            for id in workers where allowed.indices.contains(id) { allowed[id] = true }
        }
        guard allowed.contains(true) else { return .noneSooner }
        return .workers { [allowed] in allowed.indices.contains($0) && allowed[$0] }
    }

    /// The response times of worker `id`'s backend.
    func responseTimes(ofWorker id: Int) -> ResponseTimes? {
        state.withLock { state in
            state.index(ofWorker: id).map { state.backends[$0].responseTimes }
        }
    }

    /// The operation a worker runs: forward over its own connection, count the
    /// result, and eject the backend after too many failures in a row.
    func forward<Body: AsyncSequence & Sendable>(
        on worker: Int,
        _ head: HTTPRequestHead,
        body: Body,
        forwarding: ForwardedFor,
        to writer: some ClientResponseWriting,
        stop: ForwardStop? = nil
    ) async throws -> ForwardResult where Body.Element == ByteBuffer {
        // A worker is in the heap only after its entry exists (added down,
        // marked up after), and its entry goes only after it left the balancer.
        guard let connection = state.withLock({ $0.workers[worker]?.connection }) else {
            throw UpstreamError(.closedBeforeRequestSent, backend: name, detail: "worker \(worker) has no connection")
        }
        do {
            let result = try await connection.forward(head, body: body, forwarding: forwarding, to: writer, stop: stop)
            state.withLock { state in
                state.workers[worker]?.stats.record(result)
                if let index = state.index(of: connection.backend.name) { state.backends[index].passive.recordSuccess() }
            }
            return result
        } catch {
            let eject = state.withLock { state -> Bool in
                state.workers[worker]?.stats.record(error)
                guard error.kind.countsAgainstBackend, let index = state.index(of: connection.backend.name),
                    state.backends[index].passive.recordFailure()
                else { return false }
                state.backends[index].ejections += 1
                state.backends[index].lastFailure = "\(error.kind.rawValue): \(error.detail)"
                state.backends[index].generation += 1
                return true
            }
            if eject { await ejectBackend(connection.backend.name) }
            throw error
        }
    }

    /// The outcome of a forward that reached the client, naming its worker and backend.
    func forwarded(_ receipt: Receipt<ForwardResult>) -> Outcome {
        let backend = backendName(ofWorker: receipt.worker) ?? "?"
        return .forwarded(
            Served(worker: receipt.worker, backend: backend, queued: receipt.queued, ran: receipt.ran), receipt.value)
    }

    /// Takes an ejected backend out now, and puts it back (if nothing else
    /// keeps it out) when the cool-down ends.
    private func ejectBackend(_ name: String) async {
        await reconcile(name)
        let until = state.withLock { state in state.index(of: name).flatMap { state.backends[$0].passive.ejectedUntil } }
        guard let until else { return }
        Task {
            try? await Task.sleep(until: until, clock: .continuous)
            self.change(name) { _ in }
            await self.reconcile(name)
        }
    }

    // MARK: - In or out of rotation

    /// Applies `change` to backend `name`'s entry and counts it as a change
    /// for ``reconcile(_:)``, which the caller runs next.
    private func change(_ name: String, _ change: (inout BackendEntry) -> Void) {
        state.withLock { state in
            guard let index = state.index(of: name) else { return }
            change(&state.backends[index])
            state.backends[index].generation += 1
        }
    }

    /// Marks backend `name`'s workers up or down (or removes them) as its
    /// entry says now. Concurrent calls may interleave their balancer calls;
    /// each repeats until no change came in while it ran, so the last to
    /// finish has applied the latest state.
    func reconcile(_ name: String) async {
        while true {
            let plan = state.withLock { state -> (admin: AdminState, up: Bool, workers: [Int], generation: Int)? in
                guard let index = state.index(of: name) else { return nil }
                let entry = state.backends[index]
                return (entry.admin, entry.inRotation(), entry.workerIDs, entry.generation)
            }
            guard let plan else { return }
            for worker in plan.workers {
                if plan.admin == .removing {
                    await balancer.removeWorker(worker)
                } else if plan.up {
                    await balancer.markUp(worker)
                } else {
                    await balancer.markDown(worker)
                }
            }
            let (current, change) = state.withLock { state -> (Int?, (entry: BackendEntry, up: Bool)?) in
                guard let index = state.index(of: name) else { return (nil, nil) }
                let entry = state.backends[index]
                guard entry.generation == plan.generation, entry.applied != plan.up else { return (entry.generation, nil) }
                state.backends[index].applied = plan.up
                return (entry.generation, (entry, plan.up))
            }
            if let change { logRotation(change.entry, up: change.up) }
            if current == plan.generation { return }
        }
    }

    /// Logs a backend joining (info) or leaving (warning) the rotation, and why.
    private func logRotation(_ entry: BackendEntry, up: Bool) {
        let metadata = Self.logMetadata(entry.backend, connections: entry.connections)
        if up {
            logger.info("backend in rotation", metadata: metadata)
        } else {
            var metadata = metadata
            metadata["reason"] = "\(entry.outOfRotationReason())"
            logger.warning("backend out of rotation", metadata: metadata)
        }
    }

    /// What every log line about a backend says of it.
    private static func logMetadata(_ backend: Backend, connections: Int) -> Logger.Metadata {
        ["backend": "\(backend.name)", "url": "\(backend.url)", "connections": "\(connections)"]
    }

    // MARK: - Active health checks

    private func makeChecker(for backend: Backend) -> HealthChecker? {
        guard let health = configuration.health else { return nil }
        return HealthChecker(backend: backend, configuration: health.checker, eventLoop: eventLoopGroup.next()) {
            [weak self] transition in
            guard let self else { return }
            self.change(transition.backend.name) { $0.healthUp = transition.isUp }
            Task { await self.reconcile(transition.backend.name) }
        }
    }

    /// Runs every backend's active health checks (those added later start when
    /// added) until graceful shutdown or cancellation.
    public func run() async throws {
        let checkers = state.withLock { state -> [HealthChecker] in
            state.running = true
            return state.backends.compactMap(\.checker)
        }
        for checker in checkers { startChecking(checker) }
        try? await gracefulShutdown()
        let tasks = state.withLock { state -> [Task<Void, Never>] in
            state.stopped = true
            return state.backends.compactMap(\.checkerTask)
        }
        for task in tasks { task.cancel() }
    }

    private func startChecking(_ checker: HealthChecker) {
        let task = Task { _ = try? await checker.run() }
        let keep = state.withLock { state -> Bool in
            guard !state.stopped, let index = state.index(of: checker.backend.name) else { return false }
            state.backends[index].checkerTask = task
            return true
        }
        if !keep { task.cancel() }
    }

    // MARK: - Runtime changes (the admin API)

    /// Why a runtime change was refused.
    public enum ChangeError: Error, Sendable, Equatable {
        case unknownBackend(String)
        case unknownPool(String)
        /// Another backend (in any pool) has the name.
        case nameTaken(String)
        /// The backend is being removed.
        case removing(String)
    }

    /// Whether this pool has a backend `name`.
    public func hasBackend(_ name: String) -> Bool {
        state.withLock { $0.index(of: name) != nil }
    }

    /// Takes backend `name` out of rotation: its workers finish the request
    /// each is running and take no new one. Returns once they are out of the heap.
    public func drain(_ name: String) async throws(ChangeError) {
        try await setAdmin(name, to: .draining)
    }

    /// Puts a drained backend back: its workers rejoin the heap when healthy.
    public func ready(_ name: String) async throws(ChangeError) {
        try await setAdmin(name, to: .ready)
    }

    /// Sets the admin state and returns once the workers follow it.
    private func setAdmin(_ name: String, to admin: AdminState) async throws(ChangeError) {
        let result = state.withLock { state -> Result<Void, ChangeError> in
            guard let index = state.index(of: name) else { return .failure(.unknownBackend(name)) }
            if state.backends[index].admin == .removing { return .failure(.removing(name)) }
            return .success(())
        }
        try result.get()
        change(name) { $0.admin = admin }
        await reconcile(name)
    }

    /// Adds a backend with `connections` workers; they join the heap at once
    /// (its health check, if any, starts with it up, as HAProxy's do). The
    /// workers start down and are tied to their connections before the
    /// backend is listed and marked up.
    public func add(_ configuration: BackendConfiguration) async throws {
        let backend = try Backend(name: configuration.name, url: configuration.url)
        guard names.reserve(backend.name) else { throw ChangeError.nameTaken(backend.name) }
        let number = state.withLock { $0.takeNumber() }
        var workers: [Int] = []
        for _ in 0..<configuration.connections {
            let id = await balancer.addWorker(down: true, group: number)
            let connection = UpstreamConnection(backend: backend, configuration: upstreamConfiguration, eventLoop: eventLoopGroup.next())
            state.withLock { $0.workers[id] = WorkerEntry(backend: backend.name, connection: connection) }
            workers.append(id)
        }
        let checker = makeChecker(for: backend)
        let passive = PassiveHealth(maxFailures: self.configuration.maxFails, coolDown: .milliseconds(self.configuration.failTimeoutMilliseconds))
        let start = state.withLock { state -> Bool in
            state.append(
                backend, number: number, connections: configuration.connections, workerIDs: workers, passive: passive,
                checker: checker)
            return state.running && !state.stopped
        }
        if start, let checker { startChecking(checker) }
        logger.info("backend added", metadata: Self.logMetadata(backend, connections: workers.count))
        await reconcile(backend.name)
    }

    /// Removes backend `name`: its workers leave the heap now (a request queued
    /// on one goes back to the backlog and on to another backend), each leaves
    /// the pool when its running request ends, and then the backend is gone.
    /// Returns at once; ``backendsJSON()`` shows it `removing` until then.
    public func remove(_ name: String) throws(ChangeError) {
        let result = state.withLock { state -> Result<Task<Void, Never>?, ChangeError> in
            guard let index = state.index(of: name) else { return .failure(.unknownBackend(name)) }
            if state.backends[index].admin == .removing { return .failure(.removing(name)) }
            return .success(state.backends[index].checkerTask)
        }
        try result.get()?.cancel()
        change(name) { $0.admin = .removing }
        Task { await self.finishRemoving(name) }
    }

    /// Waits until backend `name`'s workers have left the balancer (or it
    /// shuts down), then forgets the backend, its name and its connections.
    /// A connection closes when its last user lets it go (``UpstreamConnection``'s
    /// deinit), so one still forwarding at shutdown is never closed under it.
    private func finishRemoving(_ name: String) async {
        await reconcile(name)
        let ids = Set(state.withLock { state in state.index(of: name).map { state.backends[$0].workerIDs } ?? [] })
        while true {
            let stats = await balancer.stats()
            if stats.shuttingDown || !stats.workers.contains(where: { ids.contains($0.id) }) { break }
            try? await Task.sleep(for: .milliseconds(20))
        }
        let workersLeft = state.withLock { state in
            if let index = state.index(of: name) { state.backends.remove(at: index) }
            for id in ids { state.workers.removeValue(forKey: id) }
            return state.workersLeft
        }
        names.release(name)
        logger.info("backend removed", metadata: ["backend": "\(name)"])
        workersLeft?(Array(ids))
    }

    /// Calls `body` with the ids of a removed backend's workers once they have
    /// left the balancer, for whatever is kept per worker (the latency
    /// histograms).
    func whenWorkersLeave(_ body: @escaping @Sendable ([Int]) -> Void) {
        state.withLock { $0.workersLeft = body }
    }

    // MARK: - Stats

    /// The backend of worker `id`, if it is one of this pool's.
    public func backendName(ofWorker id: Int) -> String? {
        state.withLock { $0.workers[id]?.backend }
    }

    /// The pool's backends for `GET /admin/backends`: name, URL, connections,
    /// admin state, health, pending.
    public func backendsJSON() async -> [JSONValue] {
        let snapshot = await balancer.stats()
        return state.withLock { state in
            state.backends.map { backendJSON($0, snapshot: snapshot, now: .now) }
        }
    }

    /// The state shown for a backend: `ready`, `draining` (requests still
    /// running), `drained`, `removing`, and `down` for a ready backend that
    /// health keeps out. `ready` once its workers are back in the heap, not
    /// before (an ejection's end is applied by a timer just after it).
    private func shownState(_ entry: BackendEntry, pending: Int, active: Bool, now: ContinuousClock.Instant) -> String {
        switch entry.admin {
        case .ready: entry.inRotation(now: now) && active ? "ready" : "down"
        case .draining: pending > 0 ? "draining" : "drained"
        case .removing: "removing"
        }
    }

    private func backendJSON(_ entry: BackendEntry, snapshot: BalancerStats, now: ContinuousClock.Instant) -> JSONValue {
        let ids = Set(entry.workerIDs)
        let workers = snapshot.workers.filter { ids.contains($0.id) }
        let pending = workers.reduce(0) { $0 + $1.pending }
        let active = workers.contains { $0.state == .active }
        var fields: [(key: String, value: JSONValue)] = [
            ("pool", .string(name)),
            ("name", .string(entry.backend.name)), ("url", .string(entry.backend.url)),
            ("connections", JSONValue(entry.connections)),
            ("state", .string(shownState(entry, pending: pending, active: active, now: now))),
            ("pending", JSONValue(pending)),
            ("ejected", .bool(entry.passive.isEjected(now: now))),
            ("retries", JSONValue(entry.retries)), ("ejections", JSONValue(entry.ejections)),
        ]
        if let checker = entry.checker {
            fields.append(("health", Self.healthJSON(checker.status, now: now)))
        }
        return .object(JSONObject(fields))
    }

    private static func healthJSON(_ status: HealthChecker.Status, now: ContinuousClock.Instant) -> JSONValue {
        var fields: [(key: String, value: JSONValue)] = [
            ("state", .string(status.isUp ? "up" : "down")), ("checks", JSONValue(status.checks)),
        ]
        if let last = status.lastCheck {
            fields.append(
                (
                    "last_check",
                    .object(
                        JSONObject([
                            ("age_ms", JSONValue((now - last.startedAt).milliseconds)),
                            ("status", last.status.map { JSONValue(Int($0.code)) } ?? .null),
                            ("result", .string(last.failure ?? "ok")),
                            ("latency_us", JSONValue(last.latency.microseconds)),
                        ])
                    )
                )
            )
        }
        return .object(JSONObject(fields))
    }

    /// Per-backend and per-worker figures for `/stats`, joined with the balancer's own.
    ///
    /// - Parameter latency: with metrics on, each worker and the pool get `latency_us`.
    func statsJSON(latency: StatsRendering.Latency? = nil) async -> JSONValue {
        let snapshot = await balancer.stats()
        let now = ContinuousClock.now
        let (backends, workers) = state.withLock { ($0.backends, $0.workers) }
        let entries = Dictionary(uniqueKeysWithValues: backends.map { ($0.backend.name, $0) })
        var items: [JSONValue] = []
        for core in snapshot.workers {
            guard let worker = workers[core.id], let entry = entries[worker.backend] else { continue }
            let figures = worker.stats
            var shown = core.state.rawValue
            switch entry.admin {
            case .draining: shown = core.pending > 0 ? "draining" : "drained"
            case .removing: shown = "removing"
            case .ready: break
            }
            var fields: [(key: String, value: JSONValue)] = [
                ("id", JSONValue(core.id)),
                ("backend", .string(entry.backend.name)),
                ("url", .string(entry.backend.url)),
                ("state", .string(shown)),
                ("pending", JSONValue(core.pending)),
                ("held", JSONValue(core.held)),
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
            if let estimate = core.latencyEstimate {
                fields.append(("latency_estimate_us", JSONValue(estimate.microseconds)))
            }
            if let checker = entry.checker {
                fields.append(("health", Self.healthJSON(checker.status, now: now)))
            }
            if let latency { fields.append(("latency_us", StatsRendering.latencyJSON(latency, worker: core.id))) }
            items.append(.object(JSONObject(fields)))
        }
        let pool: JSONValue = .object(
            JSONObject([
                ("name", .string(name)),
                ("route", configuration.route.map { .string($0) } ?? .null),
                ("strategy", .string(snapshot.strategy.rawValue)),
                ("backends", .array(backends.map { backendJSON($0, snapshot: snapshot, now: now) })),
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
                (
                    "hedging",
                    hedgeStats.withLock {
                        // The balancer's restricted requests are this pool's copies on spare capacity.
                        $0.json(delay: hedging.delay(estimate: hedgeLatency?.estimate), waiting: snapshot.waiting)
                    }
                ),
            ])
        )
        guard let latency, case .object(var object) = pool else { return pool }
        object.members.append((key: "latency_us", value: latency.pool.json))
        return .object(object)
    }
}

/// Backend names in use across every pool of a server: the admin API names a
/// backend by itself, so no two pools may share one.
public final class BackendNames: Sendable {
    private let names = Mutex<Set<String>>([])

    public init() {}

    /// Takes `name`; false if it is taken.
    func reserve(_ name: String) -> Bool { names.withLock { $0.insert(name).inserted } }

    func release(_ name: String) { _ = names.withLock { $0.remove(name) } }
}

/// The client's side of a proxied exchange: a ``ProxyResponseWriter`` that
/// also tells whether the response head has gone out.
public protocol ClientResponseWriting: ProxyResponseWriter {
    /// Whether the response head has gone to the client: after it, an error
    /// can only close the connection. A writer that still holds the head back
    /// says false, and the error is answered in its place.
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

extension UpstreamPool {
    /// The upstream pools of `configuration.effectivePools`, in order, with
    /// the server's backlog and queue timeout.
    public static func pools(
        of configuration: ServerConfiguration,
        eventLoopGroup: any EventLoopGroup,
        logger: Logger = UpstreamPool.silentLogger
    ) throws -> [UpstreamPool] {
        let names = BackendNames()
        return try configuration.effectivePools.filter { $0.kind == .upstream }.map { pool in
            try UpstreamPool(
                configuration: pool,
                backlog: configuration.backlog,
                queueTimeout: .milliseconds(configuration.queueTimeoutMilliseconds),
                names: names,
                eventLoopGroup: eventLoopGroup,
                logger: logger
            )
        }
    }
}

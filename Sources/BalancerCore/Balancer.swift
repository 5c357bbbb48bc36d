import DequeModule

/// The talk's `Balancer`: it owns the ``Pool`` and gives each request to the
/// least-loaded worker that has room.
///
/// Requesters call ``submit(_:)`` from any task. ``run()`` is the talk's
/// `balance` loop: it waits on the `work` and `done` channels together and
/// handles everything that has arrived with `dispatch` and `completed`, which
/// never suspend between taking a worker off the heap and putting it back, so
/// actor reentrancy cannot see a half-updated heap.
///
/// Under open load it never blocks: a request that finds every worker at
/// capacity waits in a bounded FIFO backlog with a deadline, or is refused with
/// ``BalancerError/overloaded``. Every submitted request ends exactly once.
///
/// ```swift
/// let balancer = Balancer(configuration: .init(workers: 4))
/// try await withThrowingDiscardingTaskGroup { group in
///     group.addTask { await balancer.run() }
///     let answer = try await balancer.submit { 6 * 7 }
///     balancer.shutdown()
/// }
/// ```
public actor Balancer {
    public nonisolated let configuration: Configuration
    private nonisolated let inbox = Inbox()

    /// Per-worker facts the pool does not keep.
    private struct Slot {
        let worker: Worker
        var state: BalancerStats.WorkerState = .active
        var pendingMax = 0
        var completed = 0
        var failed = 0
        /// Peak-EWMA latency estimate in seconds; `nil` until the first sample.
        var latency: Double?
        var lastSample = ContinuousClock.now
    }

    private enum Stage {
        /// Taking work.
        case running
        /// Work is closed; finishing what was admitted.
        case draining
        /// Everything is answered and every channel closed; waiting for the worker tasks to end.
        case closing
        /// The loop has ended.
        case stopped
    }

    private var pool = Pool()
    private var slots: [Slot?] = []
    /// Ids of the workers in the heap, ascending: round-robin's order.
    private var activeIDs: [Int] = []
    private var roundRobinNext = 0
    private var random: SplitMix64
    private var backlog = Deque<AnyRequest>()
    /// Restricted requests waiting for an eligible worker with room, oldest
    /// first (``submitOnWorker(ifRoomAmong:waitingAtMost:_:)``); served
    /// before the backlog.
    private var waiting = Deque<AnyRequest>()
    private let capacity: Int

    private var stage = Stage.running
    private var started = false
    private var liveTasks = 0
    /// The priority of the task that called `run()`, given to the worker tasks
    /// and timers, so the balance loop and its workers are scheduled alike.
    private var priority: TaskPriority?
    /// Load held against workers (``holdLoad(on:until:)``), each until its
    /// deadline; given back by the first pass after it (see
    /// ``releaseHolds()``), which the expiry timer makes sure comes while a
    /// request waits. `worker` is `nil` once the worker left the pool: its
    /// group (if any) keeps the load.
    private var holds: [(worker: Int?, group: Int?, until: ContinuousClock.Instant)] = []
    /// The earliest deadline in `holds`: before it, nothing is scanned.
    private var firstHoldEnds: ContinuousClock.Instant?
    private var expiryTimer: Task<Void, Never>?
    /// When `expiryTimer` fires.
    private var expiryDeadline: ContinuousClock.Instant?
    private var stopTimer: Task<Void, Never>?

    private var pendingTotal = 0
    /// Requests answered by the balancer (cancelled, shut down) while their
    /// operation still runs: pending until the worker reports, but no longer in flight.
    private var answeredWhileRunning = 0
    private var submitted = 0
    private var completedCount = 0
    private var failedCount = 0
    private var cancelledCount = 0
    private var overloadedCount = 0
    private var queueTimeoutCount = 0
    private var shutDownCount = 0
    private var unavailableCount = 0
    private var busyCount = 0
    private var replicasOutOfRangeCount = 0
    private var replicatedCount = 0
    private var replicaWinCount = 0
    private var cancelledCopyCount = 0
    /// Live copies of replicated requests beyond one per open request (see
    /// ``ReplicaGroup/surplus``): pending or in the backlog, not in flight.
    private var replicaSurplus = 0

    /// Creates a balancer with `configuration.workers` workers; they start with ``run()``.
    ///
    /// - Parameter groups: for each worker, by id, the group it belongs to (a
    ///   small non-negative number), or `nil` for none: workers that share one
    ///   resource, such as the connections of one upstream backend. Among
    ///   workers with equal load (`pending`, plus any held load), the
    ///   least-loaded strategy prefers the group with the fewest pending (see ``Pool``).
    /// - Precondition: `configuration.problems` is empty, and `groups`, if
    ///   given, has one entry per worker.
    public init(configuration: Configuration = .init(), groups: [Int]? = nil) {
        precondition(configuration.problems.isEmpty, configuration.problems.joined(separator: "; "))
        precondition(groups == nil || groups!.count == configuration.workers, "one group per worker")
        self.configuration = configuration
        self.capacity = configuration.effectiveCapacity
        self.random = SplitMix64(seed: configuration.seed)
        for id in 0..<configuration.workers {
            slots.append(Slot(worker: Worker(id: id)))
            pool.insert(id, group: groups?[id])
            pool.push(id)
            activeIDs.append(id)
        }
    }

    // MARK: - The requester's side

    /// Runs `operation` on the least-loaded worker and returns its value.
    ///
    /// Throws the operation's own error, or a ``BalancerError``: `overloaded`,
    /// `queueTimeout`, `cancelled` (this task was cancelled; a running operation
    /// sees the cancellation too) or `shuttingDown`.
    public nonisolated func submit<Output: Sendable>(
        _ operation: @escaping @Sendable () async throws -> Output
    ) async throws -> Output {
        try await send(Request(.plain(operation), timed: false)).value
    }

    /// ``submit(_:)``, also telling which worker ran the operation and how
    /// long it waited and ran.
    public nonisolated func submitWithReceipt<Output: Sendable>(
        _ operation: @escaping @Sendable () async throws -> Output
    ) async throws -> Receipt<Output> {
        try await send(Request(.plain(operation), timed: true))
    }

    /// ``submitWithReceipt(_:)`` for an operation that is given the id of the
    /// worker running it. A worker runs one request at a time, so it can own a
    /// resource that only it uses (an upstream pool's worker owns one
    /// connection to its backend).
    public nonisolated func submitOnWorker<Output: Sendable>(
        _ operation: @escaping @Sendable (_ worker: Int) async throws -> Output
    ) async throws -> Receipt<Output> {
        try await send(Request(.onWorker(operation), timed: true))
    }

    /// ``submitOnWorker(_:)``, which `cancellation` can also cancel from any
    /// task, as cancelling the calling task would.
    public nonisolated func submitOnWorker<Output: Sendable>(
        cancellation: Cancellation,
        _ operation: @escaping @Sendable (_ worker: Int) async throws -> Output
    ) async throws -> Receipt<Output> {
        let request = Request(.onWorker(operation), timed: true)
        return try await publish(request, cancellation: cancellation) { request.reply = .continuation($0) }
    }

    /// ``submitOnWorker(cancellation:_:)`` for a requester that does not
    /// wait: it returns at once, and `onEnd` gets the receipt or the error,
    /// exactly once, as
    /// ``submitOnWorker(ifRoomAmong:waitingAtMost:cancellation:_:onEnd:)``
    /// describes. For a hedged request's first copy, which may run on after
    /// the request was answered by another.
    public nonisolated func submitOnWorker<Output: Sendable>(
        cancellation: Cancellation,
        _ operation: @escaping @Sendable (_ worker: Int) async throws -> Output,
        onEnd: @escaping @Sendable (Result<Receipt<Output>, any Error>) -> Void
    ) {
        let request = Request(.onWorker(operation), timed: true)
        request.reply = .callback(onEnd)
        enqueue(request, cancellation: cancellation)
    }

    /// ``submitOnWorker(_:)`` restricted to the workers `eligible` accepts,
    /// and only on spare capacity: the request goes to the least-loaded
    /// eligible active worker with room (by `(pending, its group's pending,
    /// least recently dispatched, id)`, or by cost under ``Strategy/peakEWMA``), whatever the
    /// strategy, and never waits in the backlog.
    ///
    /// When none has room it waits up to `patience` for the first eligible
    /// worker that gains room, ahead of the backlog (a worker freed by a
    /// completion goes to the oldest waiting restricted request it suits
    /// before any request in the backlog), then ends with
    /// ``BalancerError/busy``; so does a waiting one when a shutdown begins.
    /// With `patience` `nil` it ends `busy` at once. It ends
    /// ``BalancerError/unavailable`` when no worker is active at all.
    /// Cancelling the calling task takes a waiting request back. For work that
    /// is worth doing only on spare capacity elsewhere, such as a hedged copy
    /// of a request on another backend.
    ///
    /// - Parameters:
    ///   - eligible: called by the balancer, on its own executor, while it
    ///     chooses (and, while the request waits, after completions); keep it
    ///     short and non-blocking.
    ///   - patience: how long the request may wait for room; `nil`: not at all.
    public nonisolated func submitOnWorker<Output: Sendable>(
        ifRoomAmong eligible: @escaping @Sendable (_ worker: Int) -> Bool,
        waitingAtMost patience: Duration? = nil,
        _ operation: @escaping @Sendable (_ worker: Int) async throws -> Output
    ) async throws -> Receipt<Output> {
        try await send(Request(.onWorker(operation), timed: true, eligible: eligible, patience: patience))
    }

    /// ``submitOnWorker(ifRoomAmong:waitingAtMost:_:)`` for a requester that
    /// does not wait: it returns at once, and `onEnd` gets the receipt or the
    /// error, exactly once, on whichever task ends the request:
    /// - the worker's, when the operation returns or throws, before the
    ///   worker reports it done (its worker still counts it pending then);
    /// - the balancer's own executor, for a request it ends itself (`busy`,
    ///   `cancelled`, `unavailable`, `shuttingDown`): a slow `onEnd` there
    ///   holds up every request;
    /// - this call's, for a balancer already shutting down: before it returns.
    ///
    /// So keep `onEnd` short and non-blocking, and take no lock in it that the
    /// caller holds here. `cancellation` (one per request) withdraws the
    /// request, or cancels its operation once running. For a hedged request's
    /// timer, which starts a copy without a task of its own for it.
    public nonisolated func submitOnWorker<Output: Sendable>(
        ifRoomAmong eligible: @escaping @Sendable (_ worker: Int) -> Bool,
        waitingAtMost patience: Duration? = nil,
        cancellation: Cancellation,
        _ operation: @escaping @Sendable (_ worker: Int) async throws -> Output,
        onEnd: @escaping @Sendable (Result<Receipt<Output>, any Error>) -> Void
    ) {
        let request = Request(.onWorker(operation), timed: true, eligible: eligible, patience: patience)
        request.reply = .callback(onEnd)
        enqueue(request, cancellation: cancellation)
    }

    /// Runs `operation` on `replicas` distinct workers at once, the talk's
    /// replicated query: the first copy to return a value answers, and the
    /// receipt names its worker; the other copies are cancelled (a queued copy
    /// is taken back without running, a running one sees cancellation).
    ///
    /// The first copy goes where the strategy sends a plain request; the others
    /// to the least-loaded other workers that have room (`pending < capacity`).
    /// Copies never wait for room: with fewer than `replicas` workers free,
    /// fewer copies run (``Receipt/copies`` says how many), so replication adds
    /// no queueing under load. With none free the request waits in the backlog
    /// as one entry and is copied when it leaves it.
    ///
    /// If every copy fails, throws the last operation error (or, if no copy's
    /// operation threw, the balancer's reason, such as `queueTimeout`).
    /// Throws ``BalancerError/replicasOutOfRange(requested:activeWorkers:)``
    /// at once unless `1 <= replicas <=` the active workers, and otherwise the
    /// errors of ``submit(_:)``. Cancelling the calling task takes back or
    /// cancels every copy. Each copy counts in its worker's `pending` until it
    /// ends or is taken back; ``stats()`` counts the request once.
    public nonisolated func submitReplicated<Output: Sendable>(
        replicas: Int,
        _ operation: @escaping @Sendable (_ worker: Int) async throws -> Output
    ) async throws -> Receipt<Output> {
        let request = ReplicatedRequest(replicas: replicas, operation)
        return try await publish(ReplicaCopy(of: request)) { request.reply = $0 }
    }

    private nonisolated func send<Output: Sendable>(_ request: Request<Output>) async throws -> Receipt<Output> {
        try await publish(request) { request.reply = .continuation($0) }
    }

    /// Submits `request` on `work` after handing its reply continuation to
    /// `setReply` (and the request to `cancellation`, if any).
    private nonisolated func publish<Output: Sendable>(
        _ request: AnyRequest,
        cancellation: Cancellation? = nil,
        _ setReply: (UnsafeContinuation<Receipt<Output>, any Error>) -> Void
    ) async throws -> Receipt<Output> {
        let inbox = self.inbox
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { continuation in
                setReply(continuation)
                enqueue(request, cancellation: cancellation)
            }
        } onCancel: {
            inbox.cancel(request)
        }
    }

    /// Hands `request`, its reply set, to the balance loop.
    private nonisolated func enqueue(_ request: AnyRequest, cancellation: Cancellation?) {
        // Cancelled before it was submitted: the cancellation goes first, as a
        // task's does, so the balance loop sees it no later than the request.
        if let cancellation, !cancellation.attach(request, to: inbox) {
            inbox.cancel(request)
        }
        if !inbox.submit(request) {
            request.fail(.shuttingDown)
        }
    }

    // MARK: - Lifecycle

    /// The talk's `balance` loop. Starts the workers, then handles requests,
    /// completions and control events until shutdown has finished. Cancelling
    /// the calling task stops it as a shutdown whose deadline has passed.
    ///
    /// Returns once every admitted request has been answered and, after a
    /// graceful shutdown, every worker task has ended. After a forced stop a
    /// worker whose operation ignores cancellation ends when that operation does.
    public func run() async {
        precondition(!started, "run() is called once per balancer")
        started = true
        priority = Task.currentPriority
        for slot in slots {
            if let slot { startTask(for: slot.worker) }
        }
        await withTaskCancellationHandler {
            await balance()
        } onCancel: { [inbox] in
            inbox.closeWork()
            inbox.control(.forceStop)
        }
    }

    /// Begins a graceful shutdown: no new request is admitted (they end with
    /// ``BalancerError/shuttingDown``); queued and running ones finish; then the
    /// worker tasks end and ``run()`` returns. If `gracePeriod` passes first,
    /// whatever remains ends with `shuttingDown` and running operations are cancelled.
    public nonisolated func shutdown(gracePeriod: Duration? = nil) {
        inbox.closeWork()
        inbox.control(.shutdown(deadline: gracePeriod.map { ContinuousClock.now + $0 }))
    }

    private func balance() async {
        var batch = Inbox.Events()
        while stage != .stopped {
            await inbox.receive(into: &batch)
            handle(batch)
            batch.removeAll()
            if stage == .draining && backlog.isEmpty && pendingTotal == 0 {
                closeAllChannels()
                stage = .closing
            }
            if stage == .closing && liveTasks == 0 {
                stage = .stopped
            }
        }
        expiryTimer?.cancel()
        stopTimer?.cancel()
    }

    /// One pass of the talk's `select`: completions first (they free room), then
    /// control, cancellations, the backlog, and new work last (FIFO). Held
    /// loads go before the completions: an operation holds load before it
    /// returns, and its worker, if draining, may leave the pool at its
    /// completion; its group then keeps the load.
    private func handle(_ events: Inbox.Events) {
        for event in events.control { if case .hold = event { control(event) } }
        for done in events.done { completed(done) }
        for event in events.control {
            if case .hold = event { continue }
            control(event)
        }
        for request in events.cancelled { cancel(request) }
        drainBacklog()
        for request in events.work { admit(request) }
    }

    // MARK: - dispatch and completed

    /// Admits a new request: to a worker with room, else to the backlog, else refused.
    private func admit(_ request: AnyRequest) {
        submitted += 1
        if request.cancelRequested {
            finish(request, with: .cancelled)
        } else if stage == .stopped || stage == .closing {
            finish(request, with: .shuttingDown)
        } else if activeIDs.isEmpty {
            finish(request, with: .unavailable)
        } else if let eligible = request.eligible {
            // The backlog holds only requests that can run anywhere: a non-empty
            // backlog here means no worker has room.
            if let position = choose(among: eligible) {
                dispatch(request, toWorkerAt: position)
            } else if let patience = request.patience, stage == .running, activeIDs.contains(where: eligible) {
                // It waits only for a worker that can take it: an active eligible one.
                request.phase = .backlog
                request.deadline = ContinuousClock.now + patience
                waiting.append(request)
                armExpiryTimer()
            } else {
                finish(request, with: .busy)
            }
        } else if let group = request.group, !(1...activeIDs.count).contains(group.requested) {
            finish(request, with: .replicasOutOfRange(requested: group.requested, activeWorkers: activeIDs.count))
        } else if backlog.isEmpty, let position = choose() {
            countReplicated(request)
            place(request, toWorkerAt: position)
        } else if backlog.count < configuration.backlog {
            countReplicated(request)
            request.phase = .backlog
            request.deadline = ContinuousClock.now + configuration.queueTimeout
            backlog.append(request)
            armExpiryTimer()
        } else {
            finish(request, with: .overloaded)
        }
    }

    private func countReplicated(_ request: AnyRequest) {
        if let group = request.group, group.requested > 1 { replicatedCount += 1 }
    }

    /// Sends `request` to the worker at heap `position`: a replicated request
    /// not yet copied goes out as its copies, anything else as itself.
    private func place(_ request: AnyRequest, toWorkerAt position: Int) {
        if let group = request.group, group.dispatched == 0 {
            dispatchCopies(of: group, first: request, toWorkerAt: position)
        } else {
            dispatch(request, toWorkerAt: position)
        }
    }

    /// Sends a replicated request's copies: `first` to the worker at heap
    /// `position` (the strategy's choice), the others to the least-loaded other
    /// workers with room, as many as have room up to `requested`.
    private func dispatchCopies(of group: ReplicaGroup, first: AnyRequest, toWorkerAt position: Int) {
        let chosen = pool.id(at: position)
        var targets = [chosen]
        var taken: [Int] = []
        while targets.count < group.requested, let id = pool.pop() {
            taken.append(id)
            guard pool.load(of: id) < capacity else { break }
            if id != chosen { targets.append(id) }
        }
        for id in taken { pool.push(id) }
        // Every copy is made (and counted open) before any is sent, so none
        // can end as the last while others are still to come.
        group.copies = [first] + (1..<targets.count).map { _ in group.makeCopy() }
        group.dispatched = targets.count
        update(group) { $0.live = targets.count }
        for (copy, id) in zip(group.copies, targets) {
            dispatch(copy, toWorkerAt: pool[id].unsafelyUnwrapped.index.unsafelyUnwrapped)
        }
    }

    /// The talk's `dispatch`: take the chosen worker off the heap, send it the
    /// request, count it pending, put it back. No suspension point inside.
    private func dispatch(_ request: AnyRequest, toWorkerAt position: Int) {
        let id = pool.remove(at: position)
        let worker = slots[id].unsafelyUnwrapped.worker
        request.phase = .dispatched(worker)
        worker.send(request)
        pool.addPending(1, to: id)
        pool.markDispatched(id)
        pool.push(id)
        pendingTotal += 1
        let pending = pool.pending(of: id)
        if pending > slots[id].unsafelyUnwrapped.pendingMax {
            slots[id]!.pendingMax = pending
        }
    }

    /// The talk's `completed`: the worker reported on `done`; count it one less
    /// pending and put it back in its place.
    private func completed(_ done: Inbox.Done) {
        let id = done.worker.id
        if let group = done.request.group {
            copyCompleted(done, of: group)
        } else {
            switch done.outcome {
            case .value:
                slots[id]?.completed += 1
                completedCount += 1
            case .error:
                slots[id]?.failed += 1
                failedCount += 1
            case .dropped:
                answeredWhileRunning -= 1
            }
        }
        if let ran = done.ran {
            recordLatency(ran, of: id)
        }
        releasePending(of: id)
    }

    /// A copy of a replicated request ran: a value that answered is a win and
    /// ends the other copies; an error that answered means every copy failed.
    private func copyCompleted(_ done: Inbox.Done, of group: ReplicaGroup) {
        let id = done.worker.id
        done.request.phase = .finished
        update(group) { group in
            group.live -= 1
            if done.outcome != .dropped { group.counted = true }
        }
        switch done.outcome {
        case .value:
            slots[id]?.completed += 1
            completedCount += 1
            if group.requested > 1 { replicaWinCount += 1 }
            endCopies(of: group)
        case .error:
            slots[id]?.failed += 1
            failedCount += 1
        case .dropped:
            break
        }
    }

    /// The request was answered: takes back every copy still queued (it never
    /// runs) and cancels every copy still running (it sees cancellation).
    private func endCopies(of group: ReplicaGroup) {
        for copy in group.copies {
            switch copy.phase {
            case .backlog:
                if let i = backlog.firstIndex(where: { $0 === copy }) {
                    backlog.remove(at: i)
                }
                finishCopy(copy, of: group, with: BalancerError.cancelled)
                cancelledCopyCount += 1
            case .dispatched(let worker):
                switch worker.withdraw(copy) {
                case .withdrawn:
                    finishCopy(copy, of: group, with: BalancerError.cancelled)
                    releasePending(of: worker.id)
                    cancelledCopyCount += 1
                case .running:
                    // `cancelRequested` marks a copy already cancelled: it ends when its worker reports.
                    guard !copy.cancelRequested else { break }
                    copy.cancelRequested = true
                    worker.cancel(ifRunning: copy)
                    cancelledCopyCount += 1
                case .gone:
                    break
                }
            case .new, .finished:
                break
            }
        }
    }

    /// A copy ended without running to its end (refused, timed out, taken
    /// back); counts the request's ending if that was its last copy.
    private func finishCopy(_ copy: AnyRequest, of group: ReplicaGroup, with error: any Error) {
        copy.phase = .finished
        let ending = group.copyEnded(with: error)
        update(group) { group in
            group.live -= 1
            if ending != nil { group.counted = true }
        }
        switch ending {
        case .operationError: failedCount += 1
        case .balancer(let error): count(error)
        case nil: break
        }
    }

    /// Applies `change` to a replicated request's bookkeeping, keeping
    /// `replicaSurplus` its sum; lets go of the copies once all have ended.
    private func update(_ group: ReplicaGroup, _ change: (ReplicaGroup) -> Void) {
        replicaSurplus -= group.surplus
        change(group)
        replicaSurplus += group.surplus
        if group.live == 0 && group.counted { group.copies.removeAll() }
    }

    /// `pending -= 1` for worker `id`, keeping heap order; a draining or removed
    /// worker whose pending reaches zero leaves the pool (a down one stays, to
    /// come back when marked up).
    private func releasePending(of id: Int) {
        if let position = pool[id]?.index {
            pool.remove(at: position)
            pool.addPending(-1, to: id)
            pool.push(id)
        } else {
            pool.addPending(-1, to: id)
            if pool.pending(of: id) == 0, let state = slots[id]?.state, state == .draining || state == .removing {
                leave(id)
            }
        }
        pendingTotal -= 1
    }

    /// The heap position of a worker with room chosen by the strategy, or nil if
    /// every worker is at capacity.
    private func choose() -> Int? {
        switch configuration.strategy {
        case .leastLoaded, .sharedQueue:
            guard let id = pool.min, pool.load(of: id) < capacity else { return nil }
            return 0
        case .roundRobin:
            let n = activeIDs.count
            for step in 0..<n {
                let id = activeIDs[(roundRobinNext + step) % n]
                if pool.load(of: id) < capacity {
                    roundRobinNext = (roundRobinNext + step + 1) % n
                    return pool[id]!.index
                }
            }
            return nil
        case .powerOfTwoChoices:
            let n = pool.count
            guard n > 1 else {
                return n == 1 && pool.load(of: pool.id(at: 0)) < capacity ? 0 : nil
            }
            let a = Int.random(in: 0..<n, using: &random)
            let b = (a + Int.random(in: 1..<n, using: &random)) % n
            let (pa, pb) = (pool.load(of: pool.id(at: a)), pool.load(of: pool.id(at: b)))
            let better = pa < pb || (pa == pb && pool.id(at: a) < pool.id(at: b)) ? a : b
            if pool.load(of: pool.id(at: better)) < capacity { return better }
            // Both sampled workers are full; the least loaded may still have room.
            return pool.load(of: pool.id(at: 0)) < capacity ? 0 : nil
        case .peakEWMA:
            return leastCostly()
        }
    }

    /// The heap position of the least-loaded active worker with room that
    /// `eligible` accepts: by cost under peak-EWMA, else by the heap's order.
    private func choose(among eligible: (Int) -> Bool) -> Int? {
        if configuration.strategy == .peakEWMA { return leastCostly(among: eligible) }
        var best: (load: Int, group: Int, lastDispatch: Int, id: Int)?
        for id in activeIDs where eligible(id) {
            guard let record = pool[id], record.load < capacity else { continue }
            let key = (record.load, pool.groupPending(of: id), record.lastDispatch, id)
            if let current = best, current <= key { continue }
            best = key
        }
        return best.flatMap { pool[$0.id]?.index }
    }

    /// Peak-EWMA's choice: the active worker with room (and accepted by
    /// `eligible`) whose `latency x (load + 1)` is least (ties: less load,
    /// then lower id; load is `pending` plus held load). A worker with no
    /// sample yet is costed at the mean of those with one.
    private func leastCostly(among eligible: (Int) -> Bool = { _ in true }) -> Int? {
        var known = 0.0
        var count = 0
        for id in activeIDs {
            if let latency = slots[id].unsafelyUnwrapped.latency {
                known += latency
                count += 1
            }
        }
        let unknown = count > 0 ? known / Double(count) : 0
        var best: (cost: Double, load: Int, id: Int)?
        for id in activeIDs where eligible(id) {
            let load = pool.load(of: id)
            guard load < capacity else { continue }
            let cost = (slots[id].unsafelyUnwrapped.latency ?? unknown) * Double(load + 1)
            if let current = best, (current.cost, current.load, current.id) <= (cost, load, id) { continue }
            best = (cost, load, id)
        }
        return best.flatMap { pool[$0.id]?.index }
    }

    /// Folds a latency sample into worker `id`'s peak-EWMA: a sample above
    /// the estimate replaces it at once; below it, the estimate decays toward
    /// the sample with weight `exp(-elapsed / latencyDecay)`.
    private func recordLatency(_ ran: Duration, of id: Int) {
        guard slots.indices.contains(id), let slot = slots[id] else { return }
        let sample = ran.seconds
        let now = ContinuousClock.now
        if let estimate = slot.latency, sample < estimate {
            let weight = decayWeight((now - slot.lastSample).seconds / configuration.latencyDecay.seconds)
            slots[id]!.latency = estimate * weight + sample * (1 - weight)
        } else {
            slots[id]!.latency = sample
        }
        slots[id]!.lastSample = now
    }

    /// Moves waiting restricted requests, then backlog requests, oldest first,
    /// to workers with room.
    private func drainBacklog() {
        releaseHolds()
        if !waiting.isEmpty { placeWaiting() }
        while !backlog.isEmpty, let position = choose() {
            place(backlog.removeFirst(), toWorkerAt: position)
        }
    }

    /// Gives each waiting restricted request, oldest first, the best eligible
    /// worker with room, while any worker has room.
    private func placeWaiting() {
        var index = waiting.startIndex
        // The heap's top has the least load: when it is full, every worker is.
        while index < waiting.endIndex, let top = pool.min, pool.load(of: top) < capacity {
            if let position = choose(among: waiting[index].eligible.unsafelyUnwrapped) {
                dispatch(waiting.remove(at: index), toWorkerAt: position)
            } else {
                index += 1
            }
        }
    }

    /// Ends with `error` each waiting restricted request that `ends` accepts
    /// (every one by default); the others keep their order.
    private func endWaiting(with error: BalancerError, where ends: (AnyRequest) -> Bool = { _ in true }) {
        var index = waiting.startIndex
        while index < waiting.endIndex {
            if ends(waiting[index]) {
                finish(waiting.remove(at: index), with: error)
            } else {
                index += 1
            }
        }
    }

    /// Ends a request that never reached a worker (or was taken back from one).
    private func finish(_ request: AnyRequest, with error: BalancerError) {
        if let group = request.group {
            finishCopy(request, of: group, with: error)
            return
        }
        request.phase = .finished
        guard request.fail(error) else { return }
        count(error)
    }

    private func count(_ error: BalancerError) {
        switch error {
        case .overloaded: overloadedCount += 1
        case .queueTimeout: queueTimeoutCount += 1
        case .cancelled: cancelledCount += 1
        case .shuttingDown: shutDownCount += 1
        case .unavailable: unavailableCount += 1
        case .busy: busyCount += 1
        case .replicasOutOfRange: replicasOutOfRangeCount += 1
        }
    }

    // MARK: - Cancellation, timeouts, control

    /// The requester was cancelled: take the request out wherever it is, or
    /// cancel its running operation and answer the requester now.
    private func cancel(_ request: AnyRequest) {
        if let group = request.group, group.dispatched > 0 {
            if group.answer(.cancelled) {
                count(.cancelled)
                update(group) { $0.counted = true }
            }
            endCopies(of: group)
            return
        }
        switch request.phase {
        case .new:
            request.cancelRequested = true
        case .backlog:
            // A restricted request is never in the backlog, only waiting.
            if request.eligible != nil {
                if let i = waiting.firstIndex(where: { $0 === request }) { waiting.remove(at: i) }
            } else if let i = backlog.firstIndex(where: { $0 === request }) {
                backlog.remove(at: i)
            }
            finish(request, with: .cancelled)
        case .dispatched(let worker):
            switch worker.withdraw(request) {
            case .withdrawn:
                finish(request, with: .cancelled)
                releasePending(of: worker.id)
            case .running:
                // Answer first: cancelling first would let the operation's own
                // CancellationError reach the requester before `cancelled` does.
                answerRunning(request, with: .cancelled)
                worker.cancel(ifRunning: request)
            case .gone:
                break
            }
        case .finished:
            break
        }
    }

    /// Answers a request whose operation is still running; its worker reports
    /// `.dropped` on `done` later.
    private func answerRunning(_ request: AnyRequest, with error: BalancerError) {
        if let group = request.group {
            guard group.answer(error) else { return }
            count(error)
            update(group) { $0.counted = true }
            return
        }
        guard request.fail(error) else { return }
        count(error)
        answeredWhileRunning += 1
    }

    private func control(_ event: Inbox.Control) {
        switch event {
        case .expire(let deadline):
            // A timer replaced just as it fired reports too: only the armed one's report disarms.
            if deadline == expiryDeadline {
                expiryTimer = nil
                expiryDeadline = nil
            }
            let now = ContinuousClock.now
            // (This pass's drainBacklog then dispatches to workers whose held load ended.)
            releaseHolds()
            while let head = backlog.first, let deadline = head.deadline, deadline <= now {
                backlog.removeFirst()
                finish(head, with: .queueTimeout)
            }
            endWaiting(with: .busy) { $0.deadline.unsafelyUnwrapped <= now }
            armExpiryTimer()
        case .shutdown(let deadline):
            guard stage == .running else { return }
            stage = .draining
            // Spare-capacity work is not started during a drain.
            endWaiting(with: .busy)
            if let deadline {
                let inbox = self.inbox
                stopTimer = Task.detached(priority: priority) {
                    try? await Task.sleep(until: deadline, clock: .continuous)
                    if !Task.isCancelled { inbox.control(.forceStop) }
                }
            }
        case .forceStop:
            forceStop()
        case .retired(let worker):
            liveTasks -= 1
            if stage != .stopped, slots.indices.contains(worker.id), slots[worker.id]?.worker === worker {
                startTask(for: worker)
            }
        case .exited:
            liveTasks -= 1
        case .hold(let id, let deadline):
            guard stage != .stopped, pool[id] != nil, deadline > .now else { return }
            pool.addHeldLoad(1, to: id)
            holds.append((id, pool.group(of: id), deadline))
            firstHoldEnds = min(firstHoldEnds ?? deadline, deadline)
            armExpiryTimer()
        }
    }

    /// The shutdown deadline passed (or `run()` was cancelled): answer every
    /// open request with `shuttingDown`, cancel running operations, stop.
    private func forceStop() {
        guard stage != .stopped else { return }
        inbox.closeWork()
        while let request = backlog.popFirst() {
            finish(request, with: .shuttingDown)
        }
        endWaiting(with: .shuttingDown)
        for case let slot? in slots {
            let queued = slot.worker.withdrawAll()
            for request in queued {
                finish(request, with: .shuttingDown)
            }
            pool.update(slot.worker.id, pending: pool.pending(of: slot.worker.id) - queued.count)
            pendingTotal -= queued.count
            if let running = slot.worker.running {
                answerRunning(running, with: .shuttingDown)
                slot.worker.cancel(ifRunning: running)
            }
        }
        closeAllChannels()
        stage = .stopped
    }

    /// Arms the timer for the earliest deadline of the backlog's head and the
    /// waiting restricted requests, and, while any request waits, of the held
    /// loads (whose end may give it a worker), unless it is armed for one no later.
    private func armExpiryTimer() {
        var next = backlog.first?.deadline
        for request in waiting {
            if let deadline = request.deadline, next.map({ deadline < $0 }) ?? true { next = deadline }
        }
        if next != nil, let holdEnds = firstHoldEnds, holdEnds < next.unsafelyUnwrapped { next = holdEnds }
        guard let deadline = next else { return }
        if expiryTimer != nil, let armed = expiryDeadline, armed <= deadline { return }
        expiryTimer?.cancel()
        expiryDeadline = deadline
        let inbox = self.inbox
        expiryTimer = Task.detached(priority: priority) {
            try? await Task.sleep(until: deadline, clock: .continuous)
            if !Task.isCancelled { inbox.control(.expire(deadline)) }
        }
    }

    // MARK: - Workers at runtime

    private func addSlot(group: Int?) -> Worker {
        let id = slots.count
        let worker = Worker(id: id)
        slots.append(Slot(worker: worker))
        pool.insert(id, group: group)
        pool.push(id)
        activeIDs.append(id)
        return worker
    }

    private func startTask(for worker: Worker) {
        liveTasks += 1
        let inbox = self.inbox
        let measuring = configuration.strategy == .peakEWMA
        Task.detached(priority: priority) {
            await worker.run(reportingTo: inbox, measuring: measuring)
        }
    }

    /// Adds a worker and returns its id; it takes work at once, backlog first.
    /// With `down`, it starts marked down and takes work only after ``markUp(_:)``:
    /// the caller can tie the id to a resource before the first request comes.
    /// `group` is as in ``init(configuration:groups:)``.
    @discardableResult
    public func addWorker(down: Bool = false, group: Int? = nil) -> Int {
        let worker = addSlot(group: group)
        if started && stage != .stopped { startTask(for: worker) }
        if down {
            _ = takeOutOfRotation(worker.id, becoming: .down)
        } else {
            drainBacklog()
        }
        return worker.id
    }

    /// Drains worker `id`: it gets no new requests, finishes those it holds,
    /// then leaves the pool. Returns false if there is no active worker `id`.
    @discardableResult
    public func drainWorker(_ id: Int) -> Bool {
        guard takeOutOfRotation(id, becoming: .draining) else { return false }
        if pool.pending(of: id) == 0 { leave(id) }
        return true
    }

    /// Removes worker `id` now: its queued requests go back to the front of the
    /// backlog (they may push it past its limit; none is lost) and on to other
    /// workers; its running request finishes, then it leaves the pool.
    /// Returns false if there is no such worker, or it is already being removed.
    @discardableResult
    public func removeWorker(_ id: Int) -> Bool {
        guard let slot = slots.indices.contains(id) ? slots[id] : nil, slot.state != .removing else { return false }
        if slot.state == .active {
            _ = takeOutOfRotation(id, becoming: .removing)
        } else {
            slots[id]!.state = .removing
        }
        requeueQueued(of: slot.worker)
        if pool.pending(of: id) == 0 { leave(id) }
        drainBacklog()
        return true
    }

    /// Counts one more request against worker `id` (and its group) until
    /// `deadline`: work its resource still does for a request the worker no
    /// longer runs. An upstream pool holds one for a hedged request's loser:
    /// cut off at the win, it is still being served by its backend (which
    /// learns of the closed connection only when it answers). Without the
    /// hold, the loser's worker would look idle the moment its request was
    /// cut, least-pending would prefer it to the busy connections of faster
    /// backends, and a slow backend whose requests hedging cuts short would
    /// be sent more of them, each needing a copy. HAProxy keeps such a
    /// request on its server's count too, until the server answers (without
    /// `option abortonclose`).
    ///
    /// Every choice sees it as a request pending on that worker, room
    /// included: a worker of capacity 1 (an upstream connection) takes no
    /// request until the hold ends, as it would not while the request ran.
    /// Its `pending`, in stats, does not change. A request waiting for room
    /// gets the worker when the hold ends (a timer wakes the balancer then).
    /// If the worker leaves the pool first, its group keeps the load until
    /// the deadline. Does nothing for a worker not in the pool, or once the
    /// balancer has stopped. It takes effect in the next balance pass: called
    /// by an operation before it returns, no later than that request's
    /// completion.
    public nonisolated func holdLoad(on id: Int, until deadline: ContinuousClock.Instant) {
        inbox.control(.hold(worker: id, until: deadline))
    }

    /// Gives back the held loads whose deadline has passed. Called first by
    /// ``drainBacklog()``, which every path that chooses a worker runs before
    /// choosing (a balance pass admits new work only after it), so no choice
    /// sees a load that has ended; also by ``stats()``, which must not show
    /// one, and by the expiry timer's event. A request waiting for the room
    /// a hold gave back gets it in the next pass, which that timer ensures.
    private func releaseHolds() {
        guard let first = firstHoldEnds else { return }
        let now = ContinuousClock.now
        guard first <= now else { return }
        firstHoldEnds = nil
        holds.removeAll { hold in
            guard hold.until <= now else {
                firstHoldEnds = min(firstHoldEnds ?? hold.until, hold.until)
                return false
            }
            if let worker = hold.worker {
                pool.addHeldLoad(-1, to: worker)
            } else if let group = hold.group {
                pool.addGroupLoad(-1, to: group)
            }
            return true
        }
    }

    /// Marks worker `id` down (a failed health check): it leaves the heap, its
    /// queued requests go back to the front of the backlog and on to other
    /// workers, its running request finishes. Returns false unless it was active.
    @discardableResult
    public func markDown(_ id: Int) -> Bool {
        guard let slot = slots.indices.contains(id) ? slots[id] : nil,
            takeOutOfRotation(id, becoming: .down)
        else { return false }
        requeueQueued(of: slot.worker)
        drainBacklog()
        return true
    }

    /// Marks a down worker up again: it rejoins the heap and takes work at
    /// once, backlog first. Returns false unless it was down.
    @discardableResult
    public func markUp(_ id: Int) -> Bool {
        guard slots.indices.contains(id), slots[id]?.state == .down else { return false }
        slots[id]!.state = .active
        pool.push(id)
        activeIDs.insert(id, at: activeIDs.firstIndex { $0 > id } ?? activeIDs.endIndex)
        drainBacklog()
        return true
    }

    /// Takes back the requests queued on `worker` that have not started and
    /// puts them, in order, at the front of the backlog with a fresh deadline:
    /// they were admitted before anything waiting there. The backlog may pass
    /// its limit for them; none is lost.
    ///
    /// A copy of a replicated request is dropped instead while another copy is
    /// open: it would only add load. A restricted request
    /// (``submitOnWorker(ifRoomAmong:waitingAtMost:_:)``) ends `busy`: it runs
    /// only on a worker it chose, so it never waits in the backlog, where any
    /// worker could take it.
    private func requeueQueued(of worker: Worker) {
        let queued = worker.withdrawAll()
        guard !queued.isEmpty else { return }
        pool.addPending(-queued.count, to: worker.id)
        pendingTotal -= queued.count
        let deadline = ContinuousClock.now + configuration.queueTimeout
        for request in queued.reversed() {
            if request.eligible != nil {
                finish(request, with: .busy)
                continue
            }
            if let group = request.group, group.endIfRedundant() {
                request.phase = .finished
                update(group) { $0.live -= 1 }
                cancelledCopyCount += 1
                continue
            }
            request.phase = .backlog
            request.deadline = deadline
            backlog.prepend(request)
        }
        armExpiryTimer()
    }

    /// Takes an active worker out of the heap and round-robin's order.
    private func takeOutOfRotation(_ id: Int, becoming state: BalancerStats.WorkerState) -> Bool {
        guard slots.indices.contains(id), slots[id]?.state == .active, let position = pool[id]?.index else {
            return false
        }
        pool.remove(at: position)
        activeIDs.removeAll { $0 == id }
        if roundRobinNext >= activeIDs.count { roundRobinNext = 0 }
        slots[id]!.state = state
        // A waiting request that no active worker can take any more (the last
        // eligible one went down, drained or left) ends now: waiting out its
        // patience would only delay its requester's next step.
        endWaiting(with: .busy) { !activeIDs.contains(where: $0.eligible.unsafelyUnwrapped) }
        return true
    }

    /// A worker out of rotation with nothing pending leaves the pool; its task ends.
    private func leave(_ id: Int) {
        guard let slot = slots[id] else { return }
        slots[id] = nil
        // What it held stays with its group (``Pool/addHeldLoad(_:to:)``).
        for index in holds.indices where holds[index].worker == id { holds[index].worker = nil }
        pool.delete(id)
        slot.worker.close()
    }

    private func closeAllChannels() {
        for case let slot? in slots {
            slot.worker.close()
        }
    }

    // MARK: - Stats

    /// A snapshot of every worker and the pool. Held loads that have ended
    /// are given back first, so `held` never shows one.
    public func stats() -> BalancerStats {
        releaseHolds()
        let refused = inbox.refusedWhileClosed.load(ordering: .relaxed)
        let workers = slots.compactMap { slot -> BalancerStats.Worker? in
            guard let slot else { return nil }
            return BalancerStats.Worker(
                id: slot.worker.id,
                state: slot.state,
                pending: pool.pending(of: slot.worker.id),
                held: pool[slot.worker.id]?.held ?? 0,
                pendingMax: slot.pendingMax,
                completed: slot.completed,
                failed: slot.failed,
                latencyEstimate: slot.latency.map { .nanoseconds(Int64($0 * 1e9)) }
            )
        }
        return BalancerStats(
            strategy: configuration.strategy,
            capacity: capacity,
            workers: workers,
            backlogDepth: backlog.count,
            waiting: waiting.count,
            backlogLimit: configuration.backlog,
            queueTimeout: configuration.queueTimeout,
            submitted: submitted + refused,
            completed: completedCount,
            failed: failedCount,
            cancelled: cancelledCount,
            overloaded: overloadedCount,
            queueTimeouts: queueTimeoutCount,
            shutDown: shutDownCount + refused,
            unavailable: unavailableCount,
            busy: busyCount,
            replicasOutOfRange: replicasOutOfRangeCount,
            inFlight: backlog.count + waiting.count + pendingTotal - answeredWhileRunning - replicaSurplus,
            replicated: replicatedCount,
            replicaWins: replicaWinCount,
            cancelledCopies: cancelledCopyCount,
            shuttingDown: stage != .running
        )
    }

    /// Whether the pool's heap is in order with every index right. For tests.
    public func poolIsValid() -> Bool {
        pool.isValid
    }
}

/// `exp(-x)` for `x >= 0`, as `(1 - x/1024)^1024`: within 0.1% of it where
/// the weight matters, with no libm (the core imports no C library).
func decayWeight(_ x: Double) -> Double {
    guard x < 1024 else { return 0 }
    var y = 1 - x / 1024
    for _ in 0..<10 { y *= y }
    return y
}

extension Duration {
    /// The duration in seconds, as a `Double`.
    public var seconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) * 1e-18
    }
}

/// A small, fast, seedable generator (SplitMix64) for power-of-two choices,
/// request ids and repeatable experiments: the system generator costs a
/// system call per number and cannot be seeded.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

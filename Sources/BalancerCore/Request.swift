import Synchronization

/// What a requester gets back with its value: which worker ran the request and
/// how long it waited and ran.
public struct Receipt<Output: Sendable>: Sendable {
    /// The operation's value.
    public var value: Output
    /// The id of the worker that ran it.
    public var worker: Int
    /// From `submit` until a worker started it (backlog plus the worker's own queue).
    public var queued: Duration
    /// How long the operation ran.
    public var ran: Duration
    /// Copies of the request sent to distinct workers: 1 for ``Balancer/submit(_:)``
    /// and its kin, up to `replicas` for ``Balancer/submitReplicated(replicas:_:)``.
    public var copies = 1
}

/// How a request's run ended, as the worker reports it on `done`.
enum Outcome: UInt8, Sendable {
    /// The operation returned and its value reached the requester.
    case value
    /// The operation threw and its error reached the requester.
    case error
    /// The requester had already been answered (cancelled, shut down): the
    /// result was dropped.
    case dropped
}

/// The balancer's view of a request: everything but the operation's type.
///
/// Ownership of the mutable fields (this is why the class is `@unchecked Sendable`):
/// - `phase` and `cancelRequested` belong to the ``Balancer`` actor;
/// - `deadline` is written by the actor while the request is in the backlog
///   (or, restricted, waits for room);
/// - the one-shot reply is claimed through `answered`, an atomic flag, so the
///   first of worker, canceller, timeout and shutdown wins and the others are no-ops.
class AnyRequest: @unchecked Sendable {
    /// Where the request is, as far as the balancer knows.
    enum Phase {
        /// Submitted, not yet seen by the balance loop.
        case new
        /// In the balancer's backlog, waiting for a worker with room.
        case backlog
        /// Sent to this worker: in its channel or running on it.
        case dispatched(Worker)
        /// Answered by the balancer itself (refused, timed out, cancelled).
        case finished
    }

    /// When `submit` was called; `nil` when the requester wants no receipt,
    /// which spares the hot path its clock reads.
    final let submittedAt: ContinuousClock.Instant?
    final var phase: Phase = .new
    final var cancelRequested = false
    /// When a request waiting in the backlog times out.
    final var deadline: ContinuousClock.Instant?
    /// For a request that may run only now and only on certain workers: which
    /// ones (called by the balancer while it chooses). `nil` for the rest.
    final let eligible: (@Sendable (Int) -> Bool)?
    /// How long a restricted request may wait for one of its workers to have
    /// room; `nil`: it runs at once or not at all.
    final let patience: Duration?
    /// The replicated request this is a copy of; `nil` for a plain request.
    final let group: ReplicaGroup?
    private final let answered = Atomic<Bool>(false)

    init(
        timed: Bool, eligible: (@Sendable (Int) -> Bool)? = nil, patience: Duration? = nil, group: ReplicaGroup? = nil
    ) {
        submittedAt = timed ? ContinuousClock.now : nil
        self.eligible = eligible
        self.patience = patience
        self.group = group
    }

    /// Claims the one-shot reply; true exactly once.
    final func claim() -> Bool {
        !answered.exchange(true, ordering: .acquiringAndReleasing)
    }

    /// Runs the operation on worker `worker` and answers the requester, unless
    /// someone answered first. Called by the worker task, one request at a time.
    func run(on worker: Int) async -> Outcome {
        fatalError("subclass responsibility")
    }

    /// Ends the request with `error` unless it was already answered.
    /// Returns whether this call answered it.
    @discardableResult
    func fail(_ error: BalancerError) -> Bool {
        fatalError("subclass responsibility")
    }
}

/// The talk's `Request`: the operation and its own reply channel.
///
/// The reply (a continuation, or a callback for a requester that does not
/// wait) is given at most once, guarded by `claim()`. It
/// tolerates a requester who has gone away: once the requester is cancelled it
/// has already been answered, and the worker's later result is dropped rather
/// than blocking or leaking.
final class Request<Output: Sendable>: AnyRequest, @unchecked Sendable {
    /// The operation, with or without the id of the worker that runs it.
    enum Operation {
        case plain(@Sendable () async throws -> Output)
        case onWorker(@Sendable (Int) async throws -> Output)
    }

    /// Where the answer goes.
    enum Reply {
        /// The requester awaits it.
        case continuation(UnsafeContinuation<Receipt<Output>, any Error>)
        /// Called with it, on whichever task answers (a worker's, or the
        /// balancer's for a request it ends itself).
        case callback(@Sendable (Result<Receipt<Output>, any Error>) -> Void)
    }

    let operation: Operation
    /// Set once, before the request is published to the balancer (by
    /// `publish`, or by the callback form of `submitOnWorker`).
    var reply: Reply?

    init(
        _ operation: Operation, timed: Bool, eligible: (@Sendable (Int) -> Bool)? = nil, patience: Duration? = nil
    ) {
        self.operation = operation
        super.init(timed: timed, eligible: eligible, patience: patience)
    }

    override func run(on worker: Int) async -> Outcome {
        let started = submittedAt == nil ? nil : ContinuousClock.now
        do {
            let value: Output
            switch operation {
            case .plain(let operation): value = try await operation()
            case .onWorker(let operation): value = try await operation(worker)
            }
            guard claim() else { return .dropped }
            var receipt = Receipt(value: value, worker: worker, queued: .zero, ran: .zero)
            if let submittedAt, let started {
                receipt.queued = started - submittedAt
                receipt.ran = ContinuousClock.now - started
            }
            answer(.success(receipt))
            return .value
        } catch {
            guard claim() else { return .dropped }
            answer(.failure(error))
            return .error
        }
    }

    @discardableResult
    override func fail(_ error: BalancerError) -> Bool {
        guard claim() else { return false }
        answer(.failure(error))
        return true
    }

    /// Gives the answer; only after `claim()` returned true.
    private func answer(_ result: Result<Receipt<Output>, any Error>) {
        switch reply.unsafelyUnwrapped {
        case .continuation(let continuation): continuation.resume(with: result)
        case .callback(let callback): callback(result)
        }
    }
}

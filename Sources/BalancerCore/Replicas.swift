/// The talk's replicated query, as the balancer runs it: one request, run as
/// copies on distinct workers; the first copy to return a value answers the
/// requester and the others are cancelled.
///
/// Ownership (this is why the classes are `@unchecked Sendable`):
/// - `requested`, `operation` and `submittedAt` are set before the request is
///   published and never change;
/// - `copies`, `dispatched`, `live` and `counted` belong to the ``Balancer`` actor;
/// - `dispatched` is also read by a copy's run, which starts only after the
///   actor sent it to a worker under that worker's lock (a happens-before edge);
/// - the reply and the failure bookkeeping live in `shared`, under a lock, since
///   copies end on worker tasks and on the actor at once.
class ReplicaGroup: @unchecked Sendable {
    /// How the last copy's ending without a value ended the request, as the balancer counts it.
    enum Ending {
        /// The requester got an operation's error: every copy failed.
        case operationError
        /// The requester got this balancer error.
        case balancer(BalancerError)
    }

    /// `replicas` as the requester asked.
    final let requested: Int
    final let submittedAt = ContinuousClock.now

    /// Every copy sent to a worker, the requester's own first; set at
    /// dispatch and emptied once the request is over, which breaks the copies'
    /// references back to the group.
    final var copies: [AnyRequest] = []
    /// Copies sent to workers (0 until the request leaves the backlog).
    final var dispatched = 0
    /// Copies not yet ended as the balancer sees it: in the backlog, queued on a
    /// worker, or running until the worker reports.
    final var live = 1
    /// Whether the balancer has counted how the request ended.
    final var counted = false

    /// Live copies beyond the one that stands for the request while it is open:
    /// what the balancer subtracts from its pending and backlog counts to get
    /// requests in flight.
    final var surplus: Int { live - (counted ? 0 : 1) }

    /// The shared half: `open` copies have not ended on any side yet.
    struct Shared {
        var answered = false
        var open = 1
        /// The error to give if every copy fails: the last operation error,
        /// else the last balancer error.
        var error: (any Error)?
        var operationFailed = false
    }

    final let shared = Locked(Shared())

    init(requested: Int) {
        self.requested = requested
    }

    /// Makes one more copy of the request and counts it open: the actor makes
    /// every extra copy before it sends any, so no copy can end as the last.
    func makeCopy() -> AnyRequest {
        fatalError("subclass responsibility")
    }

    /// Answers the requester with `error` unless someone answered first;
    /// returns whether this call answered.
    func answer(_ error: BalancerError) -> Bool {
        fatalError("subclass responsibility")
    }

    /// A copy ended without a value: `error` is its operation's error or the
    /// balancer's reason for taking it back. If it was the last open copy of an
    /// unanswered request, the requester gets the most telling error (the last
    /// operation error, else this one) and this returns how the request ended.
    func copyEnded(with error: any Error) -> Ending? {
        fatalError("subclass responsibility")
    }

    /// Counts a copy about to be taken back as ended, if another copy is
    /// still open; returns false (and changes nothing) if it is the last.
    final func endIfRedundant() -> Bool {
        shared.withLock { shared in
            guard shared.open > 1 else { return false }
            shared.open -= 1
            return true
        }
    }
}

/// A replicated request with its operation's type: the group of copies and
/// the requester's one reply.
final class ReplicatedRequest<Output: Sendable>: ReplicaGroup, @unchecked Sendable {
    let operation: @Sendable (Int) async throws -> Output
    /// Set once by the requester before the first copy is published.
    var reply: UnsafeContinuation<Receipt<Output>, any Error>?

    init(replicas: Int, _ operation: @escaping @Sendable (Int) async throws -> Output) {
        self.operation = operation
        super.init(requested: replicas)
    }

    override func makeCopy() -> AnyRequest {
        shared.withLock { $0.open += 1 }
        return ReplicaCopy(of: self)
    }

    /// A copy returned `receipt`: it answers unless another answer came first.
    func win(_ receipt: Receipt<Output>) -> Bool {
        let wins = shared.withLock { shared in
            shared.open -= 1
            defer { shared.answered = true }
            return !shared.answered
        }
        if wins { reply.unsafelyUnwrapped.resume(returning: receipt) }
        return wins
    }

    override func answer(_ error: BalancerError) -> Bool {
        let answers = shared.withLock { shared in
            defer { shared.answered = true }
            return !shared.answered
        }
        if answers { reply.unsafelyUnwrapped.resume(throwing: error) }
        return answers
    }

    override func copyEnded(with error: any Error) -> Ending? {
        let last: (any Error)? = shared.withLock { shared in
            shared.open -= 1
            let isOperation = !(error is BalancerError)
            if isOperation || !shared.operationFailed {
                shared.error = error
                shared.operationFailed = shared.operationFailed || isOperation
            }
            guard shared.open == 0, !shared.answered, let error = shared.error else { return nil }
            shared.answered = true
            return error
        }
        guard let last else { return nil }
        reply.unsafelyUnwrapped.resume(throwing: last)
        if let error = last as? BalancerError { return .balancer(error) }
        return .operationError
    }
}

/// One copy of a ``ReplicatedRequest``: what the balancer queues and a worker runs.
final class ReplicaCopy<Output: Sendable>: AnyRequest, @unchecked Sendable {
    let request: ReplicatedRequest<Output>

    init(of request: ReplicatedRequest<Output>) {
        self.request = request
        super.init(timed: false, group: request)
    }

    override func run(on worker: Int) async -> Outcome {
        let started = ContinuousClock.now
        do {
            let value = try await request.operation(worker)
            let receipt = Receipt(
                value: value,
                worker: worker,
                queued: started - request.submittedAt,
                ran: ContinuousClock.now - started,
                copies: request.dispatched
            )
            return request.win(receipt) ? .value : .dropped
        } catch {
            return request.copyEnded(with: error) == nil ? .dropped : .error
        }
    }

    /// Ends this copy with the balancer's `error`; true if that answered the
    /// requester. Only for a request refused before the balancer saw it: the
    /// balancer itself ends copies with ``ReplicaGroup/copyEnded(with:)``,
    /// which also says how the request ended.
    override func fail(_ error: BalancerError) -> Bool {
        request.copyEnded(with: error) != nil
    }
}

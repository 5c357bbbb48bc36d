/// Cancels one submitted request from any task: ``cancel()`` does what
/// cancelling the task that submitted it does (a queued request is taken back
/// without running; a running one is answered ``BalancerError/cancelled`` at
/// once and its operation sees cancellation). For a requester that must stop
/// one request without cancelling itself, such as a hedged request whose copy
/// on another backend answered first. One handle serves one request.
public final class Cancellation: Sendable {
    private enum State {
        /// Not submitted yet.
        case idle
        case submitted(AnyRequest, Inbox)
        case cancelled
    }

    private let state = Locked(State.idle)

    public init() {}

    /// Cancels the request, now or as soon as it is submitted.
    public func cancel() {
        let target: (AnyRequest, Inbox)? = state.withLock { state in
            defer { state = .cancelled }
            if case .submitted(let request, let inbox) = state { return (request, inbox) }
            return nil
        }
        if let (request, inbox) = target { inbox.cancel(request) }
    }

    /// Ties the handle to `request`; false if it was cancelled before.
    ///
    /// - Precondition: the handle has not served another request: a second
    ///   one would be silently cancelled with the first.
    func attach(_ request: AnyRequest, to inbox: Inbox) -> Bool {
        state.withLock { state in
            switch state {
            case .idle:
                state = .submitted(request, inbox)
                return true
            case .cancelled:
                return false
            case .submitted:
                preconditionFailure("a Cancellation serves one request")
            }
        }
    }
}

import DequeModule
import Synchronization

/// The talk's `Worker`: a long-lived task that reads its own request channel,
/// runs one request at a time, answers on the request's own reply, and then
/// reports itself on the balancer's `done` channel.
///
/// The channel's bound (the capacity C) is enforced by the balancer, which owns
/// this worker's `pending` and heap `index` in its ``Pool`` and sends only while
/// `pending < C`; so `send` never blocks and never fails.
///
/// Cancelling a running request cancels the worker's task, since a task's
/// cancellation cannot be scoped to one call inside it. The task then finishes
/// that request, takes no other, and reports `retired`; the balancer starts a
/// fresh task for the same worker. The common path pays nothing for this: no
/// child task per request.
final class Worker: Sendable {
    /// Stable id, as shown in stats and receipts.
    let id: Int
    private let state: Locked<State>

    private struct State {
        var queue = Deque<AnyRequest>()
        /// The worker task, parked waiting for a request.
        var waiter: UnsafeContinuation<Next, Never>?
        /// The request being run, if any.
        var running: AnyRequest?
        /// The task running `running`; valid while `running` is set.
        var task: RunningTask?
        /// The task was cancelled for its running request and must take no more.
        var retire = false
        /// No more requests will be sent; the task ends once the queue is empty.
        var closed = false
    }

    /// The worker's current task. `UnsafeCurrentTask` is not `Sendable`
    /// because it must not outlive its task; it is used here only under the
    /// lock while `running` is set, when the task is alive by construction.
    private struct RunningTask: @unchecked Sendable {
        let task: UnsafeCurrentTask
    }

    /// What the worker task does next.
    enum Next {
        case run(AnyRequest)
        /// The channel is closed and empty: end the task.
        case closed
        /// This task was cancelled: end it, so a fresh one takes over.
        case retired
    }

    /// What `withdraw` found.
    enum Withdrawal {
        /// It was still queued and is now out of the channel.
        case withdrawn
        /// It is running (and stays so: answer its requester first, then
        /// ``cancel(ifRunning:)``, so the answer is the balancer's).
        case running
        /// It is no longer here: finished.
        case gone
    }

    init(id: Int) {
        self.id = id
        self.state = Locked(State())
    }

    /// Puts `request` on the channel, waking the worker task if it is parked.
    /// Called by the balancer only while this worker has room.
    func send(_ request: AnyRequest) {
        let waiter: UnsafeContinuation<Next, Never>? = state.withLock { state in
            if let waiter = state.waiter {
                state.waiter = nil
                state.running = request
                return waiter
            }
            state.queue.append(request)
            return nil
        }
        waiter?.resume(returning: .run(request))
    }

    /// Takes `request` back if it has not started; says whether it is running.
    func withdraw(_ request: AnyRequest) -> Withdrawal {
        state.withLock { state in
            if let i = state.queue.firstIndex(where: { $0 === request }) {
                state.queue.remove(at: i)
                return .withdrawn
            }
            return state.running === request ? .running : .gone
        }
    }

    /// Cancels the worker task if it is still running `request`: the operation
    /// sees the cancellation, and the task takes no other request.
    func cancel(ifRunning request: AnyRequest) {
        state.withLock { state in
            if state.running === request { cancelRunningTask(&state) }
        }
    }

    /// Takes back every queued request that has not started, in order.
    func withdrawAll() -> [AnyRequest] {
        state.withLock { state in
            let all = Array(state.queue)
            state.queue.removeAll()
            return all
        }
    }

    /// The request running now, if any.
    var running: AnyRequest? {
        state.withLock { $0.running }
    }

    /// Closes the channel: the task ends when the queue is empty.
    func close() {
        let waiter: UnsafeContinuation<Next, Never>? = state.withLock { state in
            state.closed = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: .closed)
    }

    /// Cancelling under the lock is what makes this safe: the task cannot finish
    /// `running` and start another request while we hold it.
    private func cancelRunningTask(_ state: inout State) {
        state.retire = true
        state.task?.task.cancel()
    }

    /// The worker task's loop. Returns when the channel is closed or the task
    /// was retired after a cancellation; it reports which on `inbox`.
    func run(reportingTo inbox: Inbox, measuring: Bool) async {
        var next = await take()
        while case .run(let request) = next {
            if measuring {
                let start = ContinuousClock.now
                let outcome = await request.run(on: id)
                inbox.done(self, request, outcome, ran: ContinuousClock.now - start)
            } else {
                inbox.done(self, request, await request.run(on: id), ran: nil)
            }
            next = await take()
        }
        if case .retired = next {
            inbox.retired(self)
        } else {
            inbox.exited(self)
        }
    }

    /// Finishes the previous request and takes the next, parking if the queue is empty.
    private func take() async -> Next {
        let now: Next? = withUnsafeCurrentTask { task in
            let current = task.map(RunningTask.init)
            return state.withLock { state in
                state.running = nil
                state.task = current
                if state.retire {
                    state.retire = false
                    state.task = nil
                    return .retired
                }
                if let request = state.queue.popFirst() {
                    state.running = request
                    return .run(request)
                }
                if state.closed {
                    state.task = nil
                    return .closed
                }
                return nil
            }
        }
        if let now { return now }
        defer { state.synchronize() }
        return await withUnsafeContinuation { continuation in
            let ready: Next? = state.withLock { state in
                if let request = state.queue.popFirst() {
                    state.running = request
                    return .run(request)
                }
                if state.closed { return .closed }
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}

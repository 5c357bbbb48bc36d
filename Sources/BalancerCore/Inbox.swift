import Synchronization

/// The balancer's channels: the talk's `work` (requests from requesters) and
/// `done` (workers reporting back), plus the few control events the balance
/// loop reacts to. The balance loop is the only receiver, so one lock and one
/// parked continuation make the talk's `select` over both channels.
///
/// Senders never block: the bound on work lives in the balancer (capacity per
/// worker, backlog limit), which answers every request it cannot take.
/// `receive` hands over everything that has arrived in one batch, swapping
/// buffers so that a busy balancer allocates nothing and wakes rarely.
final class Inbox: Sendable {
    /// One batch of events, processed by the balance loop in this order.
    struct Events {
        var done: [Done] = []
        var control: [Control] = []
        var cancelled: [AnyRequest] = []
        var work: [AnyRequest] = []

        var isEmpty: Bool { done.isEmpty && control.isEmpty && cancelled.isEmpty && work.isEmpty }

        mutating func removeAll() {
            done.removeAll(keepingCapacity: true)
            control.removeAll(keepingCapacity: true)
            cancelled.removeAll(keepingCapacity: true)
            work.removeAll(keepingCapacity: true)
        }
    }

    /// A worker's report on `done`.
    struct Done {
        let worker: Worker
        let request: AnyRequest
        let outcome: Outcome
        /// How long the operation ran, when the strategy needs latency.
        let ran: Duration?
    }

    enum Control {
        /// The backlog's oldest request (or a waiting restricted one) may have
        /// passed its deadline: the expiry timer armed for this instant fired.
        case expire(ContinuousClock.Instant)
        /// Stop admitting work; finish what is admitted; stop by the deadline if given.
        case shutdown(deadline: ContinuousClock.Instant?)
        /// The shutdown deadline passed: answer everything still open.
        case forceStop
        /// The worker's task was cancelled for a running request and has ended.
        case retired(Worker)
        /// The worker's task has ended because its channel was closed.
        case exited(Worker)
        /// Hold one request of load against worker `worker` (and its group) until the instant.
        case hold(worker: Int, until: ContinuousClock.Instant)
    }

    private struct State {
        var events = Events()
        var waiter: UnsafeContinuation<Void, Never>?
        var closed = false
    }

    private let state = Locked(State())
    /// Requests refused because work was already closed (shutting down).
    let refusedWhileClosed = Atomic<Int>(0)

    init() {}

    /// Sends a request on `work`; false once work is closed for shutdown.
    func submit(_ request: AnyRequest) -> Bool {
        let (accepted, waiter): (Bool, UnsafeContinuation<Void, Never>?) = state.withLock { state in
            guard !state.closed else { return (false, nil) }
            state.events.work.append(request)
            return (true, Self.takeWaiter(&state))
        }
        waiter?.resume()
        if !accepted { refusedWhileClosed.add(1, ordering: .relaxed) }
        return accepted
    }

    /// Closes `work`: every later `submit` returns false. Other events still flow.
    func closeWork() {
        state.withLock { $0.closed = true }
    }

    /// A worker reports on `done`.
    func done(_ worker: Worker, _ request: AnyRequest, _ outcome: Outcome, ran: Duration?) {
        post { $0.done.append(Done(worker: worker, request: request, outcome: outcome, ran: ran)) }
    }

    /// A requester was cancelled.
    func cancel(_ request: AnyRequest) {
        post { $0.cancelled.append(request) }
    }

    func control(_ event: Control) {
        post { $0.control.append(event) }
    }

    func retired(_ worker: Worker) { control(.retired(worker)) }
    func exited(_ worker: Worker) { control(.exited(worker)) }

    private func post(_ add: (inout Events) -> Void) {
        let waiter = state.withLock { state in
            add(&state.events)
            return Self.takeWaiter(&state)
        }
        waiter?.resume()
    }

    private static func takeWaiter(_ state: inout State) -> UnsafeContinuation<Void, Never>? {
        defer { state.waiter = nil }
        return state.waiter
    }

    /// Swaps everything that has arrived into `batch` (which must be empty) without waiting.
    /// Returns false if nothing had arrived.
    func tryReceive(into batch: inout Events) -> Bool {
        state.withLock { state in
            guard !state.events.isEmpty else { return false }
            swap(&state.events, &batch)
            return true
        }
    }

    /// Waits until at least one event has arrived and swaps them all into `batch`.
    /// Runs on the caller's actor, so the balance loop does not hop executors.
    func receive(into batch: inout Events, isolation: isolated (any Actor)? = #isolation) async {
        while !tryReceive(into: &batch) {
            await withUnsafeContinuation(isolation: isolation) { (continuation: UnsafeContinuation<Void, Never>) in
                let ready = state.withLock { state in
                    if !state.events.isEmpty { return true }
                    state.waiter = continuation
                    return false
                }
                if ready { continuation.resume() }
            }
        }
    }
}

/// Why the balancer ended a request without running it to completion.
///
/// A request submitted to a ``Balancer`` ends exactly once: with its
/// operation's value, with the error its operation threw, or with one of these.
public enum BalancerError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Every worker was at capacity and the backlog was full: the request was
    /// refused at once and never ran.
    case overloaded
    /// The request waited in the backlog longer than the queue timeout and never ran.
    case queueTimeout
    /// The requester was cancelled. A queued request never ran; a running one
    /// saw cancellation and its result was dropped.
    case cancelled
    /// The balancer was shutting down: the request was not admitted, or it had
    /// not finished when the shutdown deadline passed.
    case shuttingDown
    /// No worker could take work at all (every one is down, draining or
    /// removed): refused at once rather than left to wait out the queue timeout.
    case unavailable
    /// The request could run only on some workers
    /// (``Balancer/submitOnWorker(ifRoomAmong:waitingAtMost:_:)``), and none
    /// of them had room in time: it never ran.
    case busy
    /// A replicated request asked for more copies than there are active
    /// workers, or for fewer than one: refused at once, never ran.
    case replicasOutOfRange(requested: Int, activeWorkers: Int)

    /// A stable machine-readable code (`overloaded`, `queue_timeout`, ...).
    public var code: String {
        switch self {
        case .overloaded: "overloaded"
        case .queueTimeout: "queue_timeout"
        case .cancelled: "cancelled"
        case .shuttingDown: "shutting_down"
        case .unavailable: "unavailable"
        case .busy: "busy"
        case .replicasOutOfRange: "replicas_out_of_range"
        }
    }

    public var description: String {
        switch self {
        case .overloaded:
            "every worker is at capacity and the backlog is full; retry later or raise the capacity or backlog"
        case .queueTimeout:
            "the request waited in the backlog longer than the queue timeout; retry later or add workers"
        case .cancelled:
            "the request was cancelled by its requester"
        case .shuttingDown:
            "the balancer is shutting down and takes no more work"
        case .unavailable:
            "no worker is available: every worker is down, draining or removed"
        case .busy:
            "no eligible worker had room in time"
        case .replicasOutOfRange(let requested, let activeWorkers):
            "replicas must be from 1 to the number of active workers (\(activeWorkers)); got \(requested)"
        }
    }
}

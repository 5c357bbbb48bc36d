import DequeModule
import Dispatch
import NIOCore
import NIOPosix
import Synchronization

/// Access-log lines on their way to their sink, which may block (a pipe that
/// nobody drains, a slow disk): a bounded queue that one dedicated thread,
/// not one of the cooperative threads that serve requests, empties into the
/// sink.
///
/// Queueing a line takes one uncontended lock and, once the queue has grown,
/// no allocation. When ``AccessLogSink/capacity`` lines are waiting, a new
/// line is dropped and counted (``dropped``) instead, and the first drop
/// calls `onFirstDrop`. The thread lives until ``finish(within:)``.
final class AccessLogQueue: Sendable {
    private struct State {
        var lines = Deque<ByteBuffer>()
        var dropped = 0
        var finishing = false
        var finished = false
    }

    private let sink: AccessLogSink
    private let state = Mutex(State())
    /// Signalled once per line queued, and once by ``finish(within:)``.
    private let wakeup = DispatchSemaphore(value: 0)
    private let thread = NIOThreadPool(numberOfThreads: 1)
    private let onFirstDrop: @Sendable () -> Void

    init(_ sink: AccessLogSink, onFirstDrop: @escaping @Sendable () -> Void = {}) {
        self.sink = sink
        self.onFirstDrop = onFirstDrop
        state.withLock { $0.lines.reserveCapacity(min(sink.capacity, 1_024)) }
        thread.start()
        thread.submit { _ in self.drain() }
    }

    /// Lines dropped because the queue was full (or came after ``finish(within:)``).
    var dropped: Int { state.withLock { $0.dropped } }

    /// Lines waiting for the sink.
    var queued: Int { state.withLock { $0.lines.count } }

    /// Queues `line` for the sink, or drops it when the queue is full.
    func write(_ line: ByteBuffer) {
        let (queued, firstDrop) = state.withLock { state -> (Bool, Bool) in
            guard !state.finishing, state.lines.count < sink.capacity else {
                state.dropped += 1
                return (false, state.dropped == 1)
            }
            state.lines.append(line)
            return (true, false)
        }
        if queued {
            wakeup.signal()
        } else if firstDrop {
            onFirstDrop()
        }
    }

    /// Takes no more lines and waits, at most `timeout`, for the queued ones
    /// to reach the sink; then lets the thread go (a sink that still blocks
    /// keeps it until it returns).
    func finish(within timeout: Duration) async {
        let first = state.withLock { state in
            defer { state.finishing = true }
            return !state.finishing
        }
        if first { wakeup.signal() }
        let deadline = ContinuousClock.now + timeout
        while !state.withLock(\.finished), ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
        if first { thread.shutdownGracefully { _ in } }
    }

    /// The thread's loop: one line per signal. Every line's signal comes
    /// after the line, so the queue is found empty only on the signal of
    /// ``finish(within:)``, once every line before it is written.
    private func drain() {
        while true {
            wakeup.wait()
            let line = state.withLock { state -> ByteBuffer? in
                if let line = state.lines.popFirst() { return line }
                state.finished = true
                return nil
            }
            guard let line else { return }
            sink.write(line)
        }
    }
}

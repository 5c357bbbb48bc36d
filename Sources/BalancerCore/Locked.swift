import Synchronization

/// `Mutex`, with its ordering made visible to ThreadSanitizer.
///
/// On Linux a contended `Mutex` is taken and released inside the standard
/// library's futex slow path, which ThreadSanitizer does not see, so it reports
/// races between critical sections that the lock in fact orders. An atomic
/// acquire on entry and release on exit, inside the lock, give it the
/// happens-before edge it needs. On x86-64 both compile to plain moves.
struct Locked<Value>: ~Copyable {
    private let mutex: Mutex<Value>
    private let order = Atomic<Int>(0)

    init(_ value: consuming sending Value) {
        mutex = Mutex(value)
    }

    @inline(__always)
    borrowing func withLock<Result, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        try mutex.withLock { (value: inout sending Value) throws(E) -> sending Result in
            _ = order.load(ordering: .acquiring)
            defer { order.store(0, ordering: .releasing) }
            return try body(&value)
        }
    }

    /// Orders what follows after the last critical section, as entering
    /// one would, without taking the lock: for a task resumed by a
    /// continuation that another thread resumed after leaving the lock. A
    /// resume that wins the race with the task's own suspension lets it run
    /// on through a path of the runtime that ThreadSanitizer does not see,
    /// and the task then reads what that thread wrote before the lock (a
    /// request's fields) with no edge TSan knows of.
    @inline(__always)
    borrowing func synchronize() {
        _ = order.load(ordering: .acquiring)
    }
}

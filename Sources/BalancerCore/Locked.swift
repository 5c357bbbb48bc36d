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
}

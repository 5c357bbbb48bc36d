import BalancerServer
import NIOCore
import NIOHTTP1
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A response writer that keeps everything it is given (for small responses).
final class CollectingResponseWriter: ProxyResponseWriter {
    struct Response: Sendable {
        var head: HTTPResponseHead?
        var body = ByteBuffer()
        var trailers: HTTPHeaders?
        var ended = false
    }

    private let state = Mutex(Response())
    var response: Response { state.withLock { $0 } }
    var head: HTTPResponseHead? { response.head }
    var bodyString: String { String(buffer: response.body) }

    func writeHead(_ head: HTTPResponseHead) async throws {
        state.withLock { $0.head = head }
    }

    func writeBody(_ buffer: ByteBuffer) async throws {
        var buffer = buffer
        _ = state.withLock { $0.body.writeBuffer(&buffer) }
    }

    func end(trailers: HTTPHeaders?) async throws {
        state.withLock {
            $0.trailers = trailers
            $0.ended = true
        }
    }
}

/// A response writer that counts body bytes, is slower than the backend (it
/// sleeps every few writes), and samples how far the backend ran ahead of it and
/// the process's resident memory.
final class CountingResponseWriter: ProxyResponseWriter {
    struct Figures: Sendable {
        var head: HTTPResponseHead?
        var bytes = 0
        var writes = 0
        var ended = false
        /// Largest (backend bytes written − bytes received here) seen.
        var maxAhead = 0
        var peakResidentBytes = 0
    }

    private let state = Mutex(Figures())
    private let backendWritten: @Sendable () -> Int
    var figures: Figures { state.withLock { $0 } }

    init(backendWritten: @escaping @Sendable () -> Int = { 0 }) {
        self.backendWritten = backendWritten
    }

    func writeHead(_ head: HTTPResponseHead) async throws {
        state.withLock { $0.head = head }
    }

    func writeBody(_ buffer: ByteBuffer) async throws {
        let written = backendWritten()
        let writes = state.withLock { figures -> Int in
            figures.bytes += buffer.readableBytes
            figures.writes += 1
            figures.maxAhead = max(figures.maxAhead, written - figures.bytes)
            return figures.writes
        }
        if writes % 32 == 0 {
            let resident = residentMemoryBytes()
            state.withLock { $0.peakResidentBytes = max($0.peakResidentBytes, resident) }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    func end(trailers: HTTPHeaders?) async throws {
        state.withLock { $0.ended = true }
    }
}

/// A writer that stops for `pause` at its first body write: a client that
/// stalls for longer than the upstream idle timeout.
final class PausingResponseWriter: ProxyResponseWriter {
    private let pause: Duration
    private let received = Atomic<Int>(0)
    var bytes: Int { received.load(ordering: .relaxed) }

    init(pause: Duration) { self.pause = pause }

    func writeHead(_ head: HTTPResponseHead) async throws {}

    func writeBody(_ buffer: ByteBuffer) async throws {
        let before = received.add(buffer.readableBytes, ordering: .relaxed).oldValue
        if before == 0 { try await Task.sleep(for: pause) }
    }

    func end(trailers: HTTPHeaders?) async throws {}
}

/// A writer whose writes fail: a client that went away.
struct FailingResponseWriter: ProxyResponseWriter {
    struct Gone: Error {}
    func writeHead(_ head: HTTPResponseHead) async throws { throw Gone() }
    func writeBody(_ buffer: ByteBuffer) async throws { throw Gone() }
    func end(trailers: HTTPHeaders?) async throws { throw Gone() }
}

/// A request body given as a list of strings, one element each.
struct ChunksBody: AsyncSequence, Sendable {
    typealias Element = ByteBuffer
    let chunks: [String]
    init(_ chunks: [String]) { self.chunks = chunks }

    struct AsyncIterator: AsyncIteratorProtocol {
        var remaining: ArraySlice<String>
        mutating func next() async throws -> ByteBuffer? {
            guard let first = remaining.popFirst() else { return nil }
            return ByteBuffer(string: first)
        }
    }
    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(remaining: chunks[...]) }
}

/// A generated request body of `total` bytes in 64 KiB slices of one buffer
/// (no allocation per element), sampling resident memory as it goes and, when
/// given what the backend has received so far, how far ahead of it the body ran.
struct GeneratedBody: AsyncSequence, Sendable {
    typealias Element = ByteBuffer
    let total: Int
    let peakResident: Peak
    var received: @Sendable () -> Int = { 0 }

    final class Peak: Sendable {
        private let value = Atomic<Int>(0)
        private let ahead = Atomic<Int>(0)
        var bytes: Int { value.load(ordering: .relaxed) }
        /// Largest (bytes produced − bytes the backend had received) seen.
        var maxAhead: Int { ahead.load(ordering: .relaxed) }
        func sample(produced: Int = 0, received: Int = 0) {
            Self.raise(value, to: residentMemoryBytes())
            Self.raise(ahead, to: produced - received)
        }
        private static func raise(_ atomic: borrowing Atomic<Int>, to candidate: Int) {
            var current = atomic.load(ordering: .relaxed)
            while candidate > current {
                let (exchanged, original) = atomic.compareExchange(
                    expected: current,
                    desired: candidate,
                    ordering: .relaxed
                )
                if exchanged { break }
                current = original
            }
        }
    }

    struct AsyncIterator: AsyncIteratorProtocol {
        let chunk = ByteBuffer(repeating: UInt8(ascii: "u"), count: 64 * 1024)
        var remaining: Int
        var producedBytes = 0
        var produced = 0
        let peak: Peak
        let received: @Sendable () -> Int
        mutating func next() async throws -> ByteBuffer? {
            guard remaining > 0 else { return nil }
            let size = Swift.min(remaining, chunk.readableBytes)
            remaining -= size
            produced += 1
            producedBytes += size
            if produced % 16 == 0 { peak.sample(produced: producedBytes, received: received()) }
            return chunk.getSlice(at: chunk.readerIndex, length: size)
        }
    }
    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(remaining: total, peak: peakResident, received: received)
    }
}

/// A request body that fails after its first element: a client whose upload broke.
struct BrokenBody: AsyncSequence, Sendable {
    typealias Element = ByteBuffer
    struct Broken: Error {}
    struct AsyncIterator: AsyncIteratorProtocol {
        var sent = false
        mutating func next() async throws -> ByteBuffer? {
            if sent { throw Broken() }
            sent = true
            return ByteBuffer(string: "first")
        }
    }
    func makeAsyncIterator() -> AsyncIterator { AsyncIterator() }
}

/// The process's resident set size, from `/proc/self/status` (`VmRSS`); 0 where there is none.
func residentMemoryBytes() -> Int {
    let fd = open("/proc/self/status", O_RDONLY)
    guard fd >= 0 else { return 0 }
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: 8192)
    let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    guard count > 0 else { return 0 }
    let text = String(decoding: bytes[..<count], as: UTF8.self)
    guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return 0 }
    return (Int(line.filter(\.isNumber)) ?? 0) * 1024
}

/// A request head for the tests, with a Host.
func upstreamTestRequest(_ method: HTTPMethod, _ uri: String, headers: [(String, String)] = []) -> HTTPRequestHead {
    var fields = HTTPHeaders([("Host", "proxy.example")])
    fields.add(contentsOf: headers)
    return HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: fields)
}

/// A `GET` request head for the tests, with a Host.
func upstreamTestRequest(_ uri: String, headers: [(String, String)] = []) -> HTTPRequestHead {
    upstreamTestRequest(.GET, uri, headers: headers)
}

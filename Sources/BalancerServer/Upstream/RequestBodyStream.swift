import NIOCore
import Synchronization

/// Hands a client's request body from the task that reads the client's
/// connection to the worker task that forwards it, with backpressure.
///
/// The connection's inbound iterator cannot leave its task, and the balancer runs
/// the forward in a worker's task, so the body must cross tasks. The producer
/// (the connection task) calls ``write(_:)`` for each piece and ``finish(throwing:)``
/// at the end; ``write(_:)`` suspends while more than `maxBufferedBytes` are
/// waiting, so a slow backend slows the client's upload instead of filling
/// memory. The consumer is ``UpstreamConnection/forward(_:body:forwarding:to:)``
/// iterating the stream once.
///
/// Single producer, single consumer, single iteration. If the consumer goes
/// away (its task is cancelled, or it stops iterating and calls ``cancel()``),
/// pending and later writes throw ``Gone`` so the producer can stop reading.
public final class RequestBodyStream: AsyncSequence, Sendable {
    public typealias Element = ByteBuffer

    /// Thrown to the producer when the consumer will read no more.
    public struct Gone: Error, Hashable {}

    private struct State {
        var buffers = CircularBuffer<ByteBuffer>(initialCapacity: 4)
        var bufferedBytes = 0
        /// Set once the producer finished; `.failure` carries its error to the consumer.
        var end: Result<Void, any Error>?
        var consumerGone = false
        var waitingConsumer: CheckedContinuation<ByteBuffer?, any Error>?
        var waitingProducer: CheckedContinuation<Void, any Error>?
    }

    private let maxBufferedBytes: Int
    private let state = Mutex(State())

    /// - Parameter maxBufferedBytes: bytes the producer may run ahead of the
    ///   consumer: ``write(_:)`` returns once the stream holds no more than this
    ///   (a larger piece is taken, and its write returns when it is consumed).
    public init(maxBufferedBytes: Int = 256 * 1024) {
        self.maxBufferedBytes = maxBufferedBytes
    }

    /// Adds one piece of the body; suspends while the consumer is too far behind.
    ///
    /// - Throws: ``Gone`` once the consumer stopped, `CancellationError` if the
    ///   producing task is cancelled while suspended.
    public func write(_ buffer: ByteBuffer) async throws {
        enum Action {
            case done
            case resumeConsumer(CheckedContinuation<ByteBuffer?, any Error>)
            case wait
            case gone
        }
        let action = state.withLock { state -> Action in
            if state.consumerGone { return .gone }
            precondition(state.end == nil, "RequestBodyStream written after finish")
            if let consumer = state.waitingConsumer {
                state.waitingConsumer = nil
                return .resumeConsumer(consumer)
            }
            state.buffers.append(buffer)
            state.bufferedBytes += buffer.readableBytes
            return state.bufferedBytes > maxBufferedBytes ? .wait : .done
        }
        switch action {
        case .done: return
        case .gone: throw Gone()
        case .resumeConsumer(let consumer):
            consumer.resume(returning: buffer)
            return
        case .wait:
            try await withTaskCancellationHandler {
                try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                    let resumeNow: Result<Void, any Error>? = state.withLock { state in
                        if state.consumerGone { return .failure(Gone()) }
                        if state.bufferedBytes <= maxBufferedBytes { return .success(()) }
                        if Task.isCancelled { return .failure(CancellationError()) }
                        state.waitingProducer = continuation
                        return nil
                    }
                    if let resumeNow { continuation.resume(with: resumeNow) }
                }
            } onCancel: {
                let producer = state.withLock { state -> CheckedContinuation<Void, any Error>? in
                    defer { state.waitingProducer = nil }
                    return state.waitingProducer
                }
                producer?.resume(throwing: CancellationError())
            }
        }
    }

    /// Ends the body: normally, or with `error` which the consumer then throws.
    public func finish(throwing error: (any Error)? = nil) {
        let consumer = state.withLock { state -> CheckedContinuation<ByteBuffer?, any Error>? in
            guard state.end == nil else { return nil }
            state.end = error.map { .failure($0) } ?? .success(())
            defer { state.waitingConsumer = nil }
            return state.waitingConsumer
        }
        if let error { consumer?.resume(throwing: error) } else { consumer?.resume(returning: nil) }
    }

    /// The consumer will read no more: buffered pieces are dropped and the producer's writes throw ``Gone``.
    public func cancel() {
        let (producer, consumer) = state.withLock { state in
            state.consumerGone = true
            state.buffers.removeAll()
            state.bufferedBytes = 0
            defer {
                state.waitingProducer = nil
                state.waitingConsumer = nil
            }
            return (state.waitingProducer, state.waitingConsumer)
        }
        producer?.resume(throwing: Gone())
        consumer?.resume(throwing: CancellationError())
    }

    /// The next piece, `nil` at the end; throws the producer's error, or
    /// `CancellationError` if the consuming task is cancelled (which also ends the stream).
    func next() async throws -> ByteBuffer? {
        enum Action {
            case value(ByteBuffer, resumeProducer: CheckedContinuation<Void, any Error>?)
            case end(Result<Void, any Error>)
            case wait
        }
        let action = state.withLock { state -> Action in
            if let (buffer, producer) = pop(&state) {
                return .value(buffer, resumeProducer: producer)
            }
            if let end = state.end { return .end(end) }
            if state.consumerGone { return .end(.failure(CancellationError())) }
            return .wait
        }
        switch action {
        case .value(let buffer, let producer):
            producer?.resume()
            return buffer
        case .end(.success):
            return nil
        case .end(.failure(let error)):
            throw error
        case .wait:
            return try await withTaskCancellationHandler {
                try await withCheckedThrowingContinuation {
                    (continuation: CheckedContinuation<ByteBuffer?, any Error>) in
                    let (resumeNow, producer) = state.withLock {
                        state -> (Result<ByteBuffer?, any Error>?, CheckedContinuation<Void, any Error>?) in
                        if let (buffer, producer) = pop(&state) { return (.success(buffer), producer) }
                        switch state.end {
                        case .success?: return (.success(nil), nil)
                        case .failure(let error)?: return (.failure(error), nil)
                        case nil: break
                        }
                        if state.consumerGone || Task.isCancelled { return (.failure(CancellationError()), nil) }
                        state.waitingConsumer = continuation
                        return (nil, nil)
                    }
                    producer?.resume()
                    if let resumeNow { continuation.resume(with: resumeNow) }
                }
            } onCancel: {
                self.cancel()
            }
        }
    }

    /// Takes the first buffered piece; also hands back the producer to resume if
    /// this brought the stream under its limit.
    private func pop(_ state: inout State) -> (ByteBuffer, CheckedContinuation<Void, any Error>?)? {
        guard let buffer = state.buffers.popFirst() else { return nil }
        state.bufferedBytes -= buffer.readableBytes
        guard state.bufferedBytes <= maxBufferedBytes, let producer = state.waitingProducer else {
            return (buffer, nil)
        }
        state.waitingProducer = nil
        return (buffer, producer)
    }

    public struct AsyncIterator: AsyncIteratorProtocol {
        let stream: RequestBodyStream
        public mutating func next() async throws -> ByteBuffer? { try await stream.next() }
    }

    /// Iterate once: a second iterator would compete for the same pieces.
    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(stream: self) }
}

/// A request body held in memory: replayable, so a failed forward of it may be
/// retried (see ``UpstreamError/isRetryable(method:bodyReplayable:)``).
public struct BufferedRequestBody: AsyncSequence, Sendable {
    public typealias Element = ByteBuffer
    public let buffers: [ByteBuffer]

    public init(_ buffers: [ByteBuffer]) { self.buffers = buffers }

    public struct AsyncIterator: AsyncIteratorProtocol {
        var remaining: ArraySlice<ByteBuffer>
        public mutating func next() async throws -> ByteBuffer? { remaining.popFirst() }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(remaining: buffers[...]) }
}

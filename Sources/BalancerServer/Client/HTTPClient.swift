import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A small HTTP/1.1 client on SwiftNIO, for the command line's subcommands
/// (`healthcheck`, `job`, `stats`) and for load generators.
///
/// ``withConnection(_:)`` opens one keep-alive TCP connection and sends
/// requests on it one at a time; ``send(_:)`` is the one-shot convenience (a
/// connection for one request). Every request gets the whole of
/// ``Configuration/timeout`` for its exchange: past it the connection is
/// closed and the request throws ``HTTPClientError/Kind/timeout``.
///
/// Not a general-purpose client: no TLS, no redirects, no proxies, no
/// pipelining, and a response body is collected whole (up to
/// ``Configuration/maxResponseBodyBytes``).
public struct HTTPClient: Sendable {
    public struct Configuration: Sendable, Hashable {
        /// For connecting, and then for each request's whole exchange; one
        /// longer than about 292 years counts as that long.
        public var timeout: Duration
        /// A longer response body fails the request with ``HTTPClientError/Kind/bodyTooLarge``.
        public var maxResponseBodyBytes: Int

        public init(timeout: Duration = .seconds(10), maxResponseBodyBytes: Int = 16 << 20) {
            self.timeout = timeout
            self.maxResponseBodyBytes = maxResponseBodyBytes
        }
    }

    public let baseURL: HTTPBaseURL
    public let configuration: Configuration
    private let eventLoopGroup: any EventLoopGroup

    public init(
        baseURL: HTTPBaseURL,
        configuration: Configuration = .init(),
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) {
        self.baseURL = baseURL
        self.configuration = configuration
        self.eventLoopGroup = eventLoopGroup
    }

    /// A client for `url` (`http://host[:port][/prefix]`).
    public init(url: String, configuration: Configuration = .init()) throws(HTTPBaseURLError) {
        self.init(baseURL: try HTTPBaseURL(url), configuration: configuration)
    }

    /// Sends one request on a new connection, and closes it.
    public func send(_ request: HTTPClientRequest) async throws(HTTPClientError) -> HTTPClientResponse {
        let channel = try await connect()
        do {
            return try await channel.executeThenClose { inbound, outbound in
                try await connection(channel.channel, inbound, outbound).send(request)
            }
        } catch let error as HTTPClientError {
            throw error
        } catch {
            // executeThenClose rethrows only what its body threw: not reached.
            throw HTTPClientError(.connectionClosed, url: baseURL, detail: "\(error)")
        }
    }

    /// Opens one keep-alive connection, lends it to `body`, and closes it when
    /// `body` returns or throws.
    ///
    /// - Throws: ``HTTPClientError`` (`connectFailed`) when there is no
    ///   connection; otherwise what `body` throws.
    public func withConnection<Result>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (HTTPClientConnection) async throws -> sending Result
    ) async throws -> sending Result {
        let channel = try await connect()
        return try await channel.executeThenClose { inbound, outbound in
            try await body(connection(channel.channel, inbound, outbound))
        }
    }

    private func connection(
        _ channel: any Channel,
        _ inbound: NIOAsyncChannelInboundStream<HTTPClientResponsePart>,
        _ outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
    ) -> HTTPClientConnection {
        HTTPClientConnection(
            channel: channel,
            inbound: inbound.makeAsyncIterator(),
            outbound: outbound,
            baseURL: baseURL,
            configuration: configuration
        )
    }

    private func connect() async throws(HTTPClientError) -> HTTPClientConnection.AsyncConnection {
        let bootstrap = ClientBootstrap(group: eventLoopGroup)
            .connectTimeout(TimeAmount(configuration.timeout))
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
        do {
            return try await bootstrap.connect(host: baseURL.host, port: baseURL.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try HTTPClientConnection.AsyncConnection(wrappingChannelSynchronously: channel)
                }
            }
        } catch {
            throw HTTPClientError(.connectFailed, url: baseURL, detail: "cannot connect to \(baseURL.authority): \(error)")
        }
    }
}

/// One request: a method, a path under the client's prefix, headers and a body.
public struct HTTPClientRequest: Sendable {
    public var method: HTTPMethod
    /// Starts with `/`; may carry a query.
    public var path: String
    /// `Host`, `Content-Length` and `User-Agent` are added when missing.
    public var headers: HTTPHeaders
    public var body: ByteBuffer?

    public init(method: HTTPMethod = .GET, path: String, headers: HTTPHeaders = [:], body: ByteBuffer? = nil) {
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
    }

    /// A `GET` of `path`.
    public static func get(_ path: String) -> HTTPClientRequest { HTTPClientRequest(path: path) }

    /// A `POST` of a JSON text to `path`.
    public static func post(_ path: String, json: String) -> HTTPClientRequest {
        HTTPClientRequest(
            method: .POST,
            path: path,
            headers: ["Content-Type": "application/json"],
            body: ByteBuffer(string: json)
        )
    }
}

/// A whole response.
public struct HTTPClientResponse: Sendable {
    public var status: HTTPResponseStatus
    public var headers: HTTPHeaders
    public var body: ByteBuffer

    /// The body as UTF-8 text (invalid bytes replaced).
    public var text: String { String(buffer: body) }
}

/// Why a request failed, and which server it was for.
public struct HTTPClientError: Error, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable, Hashable {
        /// No TCP connection (refused, unreachable, or not within the timeout).
        case connectFailed = "connect_failed"
        /// The exchange did not finish within the timeout; the connection was closed.
        case timeout
        /// The server closed the connection before a whole response, or it was
        /// already closed (after `Connection: close`) when the request was sent.
        case connectionClosed = "connection_closed"
        /// The bytes were not a valid HTTP/1.1 response.
        case invalidResponse = "invalid_response"
        /// The response body was over ``HTTPClient/Configuration/maxResponseBodyBytes``.
        case bodyTooLarge = "body_too_large"
        /// The calling task was cancelled; the connection was closed.
        case cancelled
    }

    public let kind: Kind
    public let url: HTTPBaseURL
    public let detail: String

    public init(_ kind: Kind, url: HTTPBaseURL, detail: String) {
        self.kind = kind
        self.url = url
        self.detail = detail
    }

    public var description: String { "\(url): \(kind.rawValue): \(detail)" }
}

/// One open keep-alive connection, lent by ``HTTPClient/withConnection(_:)``
/// to one task; it sends one request at a time.
///
/// After a response with `Connection: close`, a failure or a timeout the
/// connection is closed and ``isOpen`` is false: further requests throw
/// ``HTTPClientError/Kind/connectionClosed``; open a new connection.
public final class HTTPClientConnection {
    typealias AsyncConnection = NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>

    private let channel: any Channel
    private var inbound: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
    private let outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
    private let baseURL: HTTPBaseURL
    private let configuration: HTTPClient.Configuration
    private var closed = false

    init(
        channel: any Channel,
        inbound: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator,
        outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>,
        baseURL: HTTPBaseURL,
        configuration: HTTPClient.Configuration
    ) {
        self.channel = channel
        self.inbound = inbound
        self.outbound = outbound
        self.baseURL = baseURL
        self.configuration = configuration
    }

    /// Whether the next ``send(_:)`` can use this connection.
    public var isOpen: Bool { !closed && channel.isActive }

    /// Sends `request` and waits for its whole response.
    public func send(_ request: HTTPClientRequest) async throws(HTTPClientError) -> HTTPClientResponse {
        guard isOpen else {
            throw HTTPClientError(.connectionClosed, url: baseURL, detail: "the connection was closed before this request")
        }
        let head = requestHead(request)
        let channel = self.channel
        let timedOut = TimeoutFlag()
        let deadline = channel.eventLoop.scheduleTask(in: TimeAmount(configuration.timeout)) {
            timedOut.set()
            channel.close(promise: nil)
        }
        defer { deadline.cancel() }
        let outcome: Result<(HTTPClientResponse, keepAlive: Bool), HTTPClientError> = await withTaskCancellationHandler {
            await exchange(head: head, body: request.body)
        } onCancel: {
            channel.close(promise: nil)
        }
        switch outcome {
        case .success(let (response, keepAlive)):
            if !keepAlive { close() }
            return response
        case .failure(let error):
            close()
            if timedOut.isSet {
                throw HTTPClientError(.timeout, url: baseURL, detail: "no whole response to \(request.method) \(head.uri) within \(configuration.timeout)")
            }
            if Task.isCancelled {
                throw HTTPClientError(.cancelled, url: baseURL, detail: "\(request.method) \(head.uri) was cancelled")
            }
            throw error
        }
    }

    private func close() {
        closed = true
        channel.close(promise: nil)
    }

    private func requestHead(_ request: HTTPClientRequest) -> HTTPRequestHead {
        var headers = request.headers
        if !headers.contains(name: "Host") { headers.add(name: "Host", value: baseURL.hostHeader) }
        if !headers.contains(name: "User-Agent") { headers.add(name: "User-Agent", value: "swift-balancer") }
        if let body = request.body, !headers.contains(name: "Content-Length") {
            headers.add(name: "Content-Length", value: String(body.readableBytes))
        }
        return HTTPRequestHead(
            version: .http1_1,
            method: request.method,
            uri: baseURL.target(request.path),
            headers: headers
        )
    }

    /// Writes the request and reads its response; never throws, so ``send(_:)``
    /// decides in one place what a failure means for the connection.
    private func exchange(
        head: HTTPRequestHead,
        body: ByteBuffer?
    ) async -> Result<(HTTPClientResponse, keepAlive: Bool), HTTPClientError> {
        func failure(
            _ kind: HTTPClientError.Kind,
            _ detail: String
        ) -> Result<(HTTPClientResponse, keepAlive: Bool), HTTPClientError> {
            .failure(HTTPClientError(kind, url: baseURL, detail: detail))
        }
        do {
            if let body {
                try await outbound.write(contentsOf: [.head(head), .body(.byteBuffer(body)), .end(nil)])
            } else {
                try await outbound.write(contentsOf: [.head(head), .end(nil)])
            }
        } catch {
            return failure(.connectionClosed, "cannot send \(head.method) \(head.uri): \(error)")
        }
        var response: HTTPClientResponse?
        var keepAlive = false
        do {
            while let part = try await inbound.next() {
                switch part {
                case .head(let responseHead):
                    guard response == nil else { return failure(.invalidResponse, "a second response head") }
                    response = HTTPClientResponse(status: responseHead.status, headers: responseHead.headers, body: ByteBuffer())
                    keepAlive = responseHead.isKeepAlive
                case .body(var buffer):
                    guard response != nil else { return failure(.invalidResponse, "body bytes before the head") }
                    guard response!.body.readableBytes + buffer.readableBytes <= configuration.maxResponseBodyBytes else {
                        return failure(.bodyTooLarge, "the response body is over \(configuration.maxResponseBodyBytes) bytes")
                    }
                    response!.body.writeBuffer(&buffer)
                case .end:
                    guard let response else { return failure(.invalidResponse, "a response end without a head") }
                    return .success((response, keepAlive))
                }
            }
        } catch HTTPParserError.invalidEOFState {
            return failure(.connectionClosed, "the server closed the connection in the middle of the response to \(head.method) \(head.uri)")
        } catch let error as HTTPParserError {
            return failure(.invalidResponse, "\(error)")
        } catch {
            return failure(.connectionClosed, "\(error)")
        }
        return failure(.connectionClosed, "the server closed the connection before a whole response to \(head.method) \(head.uri)")
    }
}

/// Set once by the deadline on the event loop, read by the requesting task.
private final class TimeoutFlag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .relaxed) }
    var isSet: Bool { value.load(ordering: .relaxed) }
}

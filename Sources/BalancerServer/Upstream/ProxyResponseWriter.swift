import NIOCore
import NIOHTTP1

/// Where ``UpstreamConnection/forward(_:body:forwarding:to:)`` streams a backend's
/// response: the client side of the proxy.
///
/// Calls come in order from one task: ``writeHead(_:)`` once, ``writeBody(_:)``
/// zero or more times, ``end(trailers:)`` once (unless the exchange fails part
/// way, in which case the forwarder stops calling and throws), with ``flush()``
/// after the head whenever the backend has sent nothing more for now. Each call must
/// return only when the writer can take more (the client's socket accepted it or
/// has room), because the forwarder reads the next bytes from the backend only
/// after the previous write returned: that is the backpressure that keeps a
/// large body in bounded memory. A throw means the client is gone; the forwarder
/// then closes the upstream connection and reports ``UpstreamError/Kind/clientAborted``.
public protocol ProxyResponseWriter: Sendable {
    /// The response head, hop-by-hop headers already removed and `Via` added.
    func writeHead(_ head: HTTPResponseHead) async throws
    /// One piece of the response body, as it arrived from the backend.
    func writeBody(_ buffer: ByteBuffer) async throws
    /// The end of the response, with the backend's trailers if it sent any.
    func end(trailers: HTTPHeaders?) async throws
    /// Nothing more of the response is ready from the backend right now: a
    /// writer that holds parts back to write them together must pass them on,
    /// or a response the backend streams slowly would stall at the proxy.
    func flush() async throws
}

extension ProxyResponseWriter {
    /// A writer that passes each part on as it comes holds nothing to flush.
    public func flush() async throws {}
}

/// What the proxy adds about the client to the forwarded request
/// (`X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`).
public struct ForwardedFor: Sendable, Hashable {
    /// The client's IP address as text, without the port; `nil` if unknown (then
    /// `X-Forwarded-For` is passed on unchanged).
    public var clientAddress: String?
    /// The `Host` the client asked for; `nil` to use the request's `Host` header.
    public var host: String?
    /// The scheme the client used on our listener: `http` or `https`.
    public var proto: String
    /// Sent as `X-Request-Id` in place of the client's; `nil` passes the client's on.
    public var requestID: String?

    public init(clientAddress: String?, host: String? = nil, proto: String = "http", requestID: String? = nil) {
        self.clientAddress = clientAddress
        self.host = host
        self.proto = proto
        self.requestID = requestID
    }

    /// The client's address taken from a NIO `SocketAddress` (IP only, no port).
    public init(client: SocketAddress?, host: String? = nil, proto: String = "http", requestID: String? = nil) {
        self.init(clientAddress: client?.ipAddress, host: host, proto: proto, requestID: requestID)
    }
}

/// Timeouts and limits of one upstream connection.
public struct UpstreamConfiguration: Sendable, Hashable {
    /// How long a TCP connect to the backend may take (`connectTimeout` error).
    public var connectTimeout: TimeAmount
    /// How long after the request was fully sent the response head may take
    /// (`responseTimeout` error, 504). Like Go's `ResponseHeaderTimeout`.
    public var responseHeaderTimeout: TimeAmount
    /// How long the backend may stay silent while we wait for response body bytes,
    /// or stall reading our request body (it does not count time we spend
    /// waiting on a slow client).
    public var idleTimeout: TimeAmount
    /// Largest response head accepted from a backend, in bytes.
    public var maxResponseHeaderBytes: Int
    /// Inbound parts buffered before reading from the backend pauses (high
    /// watermark of the response stream); with reads of up to 64 KiB this bounds
    /// the bytes a connection holds while the client is slower than the backend.
    public var responseBufferParts: Int

    public init(
        connectTimeout: TimeAmount = .seconds(3),
        responseHeaderTimeout: TimeAmount = .seconds(30),
        idleTimeout: TimeAmount = .seconds(60),
        maxResponseHeaderBytes: Int = 64 * 1024,
        responseBufferParts: Int = 8
    ) {
        self.connectTimeout = connectTimeout
        self.responseHeaderTimeout = responseHeaderTimeout
        self.idleTimeout = idleTimeout
        self.maxResponseHeaderBytes = maxResponseHeaderBytes
        self.responseBufferParts = responseBufferParts
    }
}

/// What one successful ``UpstreamConnection/forward(_:body:forwarding:to:)`` did,
/// for per-worker stats.
public struct ForwardResult: Sendable, Hashable {
    /// The backend's final status (after any 1xx interim responses).
    public var status: HTTPResponseStatus
    /// Request body bytes sent to the backend (payload, without framing).
    public var requestBodyBytes: Int
    /// Response body bytes received from the backend and written to the client.
    public var responseBodyBytes: Int
    /// Whether the exchange ran on a connection kept from an earlier request.
    public var reusedConnection: Bool
    /// Whether the connection stays open for the next request.
    public var keptAlive: Bool

    public init(
        status: HTTPResponseStatus,
        requestBodyBytes: Int,
        responseBodyBytes: Int,
        reusedConnection: Bool,
        keptAlive: Bool
    ) {
        self.status = status
        self.requestBodyBytes = requestBodyBytes
        self.responseBodyBytes = responseBodyBytes
        self.reusedConnection = reusedConnection
        self.keptAlive = keptAlive
    }

    /// 1 to 5: the first digit of the status code.
    public var statusClass: Int { Int(status.code / 100) }
}

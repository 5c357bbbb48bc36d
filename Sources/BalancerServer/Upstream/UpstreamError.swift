import NIOHTTP1

/// Why forwarding a request to a backend failed, classified for the caller's
/// retry decision and status code.
///
/// The kinds follow the life of one exchange: connect, send, receive the head,
/// stream the body. Where in that life the failure happened decides whether the
/// request may be tried again (``Kind/retry``) and which status the client gets
/// (``Kind/suggestedStatus``).
public struct UpstreamError: Error, Sendable, CustomStringConvertible {
    /// The phase of the exchange that failed.
    public enum Kind: String, Sendable, Hashable, CaseIterable {
        /// The TCP connect was refused or the host is unreachable: nothing was sent.
        case connectFailed = "connect_failed"
        /// The connect did not finish within the connect timeout: nothing was sent.
        case connectTimeout = "connect_timeout"
        /// The connection failed before any byte of the request was written.
        case closedBeforeRequestSent = "closed_before_request_sent"
        /// The connection failed after the request (or part of it) was written and
        /// before a response head arrived: the backend may have acted on it.
        case failedAfterRequestSent = "failed_after_request_sent"
        /// No response head within the response-header timeout after the request was sent.
        case responseTimeout = "response_timeout"
        /// The backend answered bytes that are not a valid HTTP/1.1 response head.
        case invalidResponse = "invalid_response"
        /// The response head had arrived when the body broke off (reset, early
        /// close, idle timeout, bad framing): only aborting the client connection
        /// is left, unless the head had not gone out to the client yet (then 502).
        case responseTruncated = "response_truncated"
        /// The client went away (task cancelled, its body stream failed, or writing
        /// to it failed): the upstream connection was closed, there is nobody to answer.
        case clientAborted = "client_aborted"

        /// Whether this failure allows the request to be tried again, on this or
        /// another backend. This is the one place the retry rules live.
        public var retry: RetryPolicy {
            switch self {
            case .connectFailed, .connectTimeout, .closedBeforeRequestSent:
                return .always
            case .failedAfterRequestSent:
                return .ifIdempotentAndReplayable
            case .responseTimeout, .invalidResponse, .responseTruncated, .clientAborted:
                return .never
            }
        }

        /// The status the client should get for this failure, when a response can
        /// still be sent: 504 for timeouts, 502 for the rest. `nil` when the
        /// response head is already out or there is no client.
        public var suggestedStatus: HTTPResponseStatus? {
            switch self {
            case .connectTimeout, .responseTimeout: return .gatewayTimeout
            case .connectFailed, .closedBeforeRequestSent, .failedAfterRequestSent, .invalidResponse: return .badGateway
            case .responseTruncated, .clientAborted: return nil
            }
        }
    }

    /// When a failed request may be tried again.
    public enum RetryPolicy: Sendable, Hashable {
        /// Nothing reached the backend: retry anywhere, whatever the method.
        case always
        /// The backend may have seen the request: retry only an idempotent method
        /// (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) whose body can be sent again
        /// (it was empty or is fully buffered).
        case ifIdempotentAndReplayable
        /// Never retry: the outcome is decided or already visible to the client.
        case never
    }

    public let kind: Kind
    /// The ``Backend/name`` of the backend that failed.
    public let backend: String
    /// What happened, for logs and error bodies.
    public let detail: String
    /// Request body bytes written towards the backend before the failure.
    public let requestBodyBytes: Int
    /// Response body bytes received (and passed to the client) before the failure.
    public let responseBodyBytes: Int

    public init(_ kind: Kind, backend: String, detail: String, requestBodyBytes: Int = 0, responseBodyBytes: Int = 0) {
        self.kind = kind
        self.backend = backend
        self.detail = detail
        self.requestBodyBytes = requestBodyBytes
        self.responseBodyBytes = responseBodyBytes
    }

    /// Whether the request that failed this way may be tried again.
    ///
    /// - Parameters:
    ///   - method: the request's method; only idempotent ones are retried once the
    ///     backend may have seen them.
    ///   - bodyReplayable: whether the caller can send the same body again (it was
    ///     empty, or it kept all of it).
    public func isRetryable(method: HTTPMethod, bodyReplayable: Bool) -> Bool {
        switch kind.retry {
        case .always: return true
        case .never: return false
        case .ifIdempotentAndReplayable: return method.isIdempotent && bodyReplayable
        }
    }

    public var description: String { "backend \(backend): \(kind.rawValue): \(detail)" }
}

extension HTTPMethod {
    /// RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT and DELETE.
    public var isIdempotent: Bool {
        switch self {
        case .GET, .HEAD, .OPTIONS, .TRACE, .PUT, .DELETE: return true
        default: return false
        }
    }
}

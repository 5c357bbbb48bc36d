import BalancerCore
import NIOCore
import NIOHTTP1

/// An error answer: `{"error":"<code>","message":"<text>"}` with its status.
///
/// Every error the server sends is one of these, and ``init(_:)`` is the one
/// place that maps a thrown error (a ``BalancerError``, a ``JobError``, a
/// timeout) to its HTTP status.
public struct APIError: Error, Sendable, Equatable {
    public var status: HTTPResponseStatus
    /// Stable machine-readable code.
    public var code: String
    /// What happened and what to do, for a person.
    public var message: String
    /// Extra headers: `Allow` for 405, `Retry-After` for 503.
    public var headers: [(String, String)]

    public init(status: HTTPResponseStatus, code: String, message: String, headers: [(String, String)] = []) {
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
    }

    public static func == (lhs: APIError, rhs: APIError) -> Bool {
        lhs.status == rhs.status && lhs.code == rhs.code && lhs.message == rhs.message
            && lhs.headers.map { "\($0.0):\($0.1)" } == rhs.headers.map { "\($0.0):\($0.1)" }
    }

    /// Seconds a client is told to wait before retrying after a 503.
    public static let retryAfterSeconds = 1

    /// Maps any error thrown while answering a request to its status and code.
    public init(_ error: any Error) {
        switch error {
        case let error as APIError:
            self = error
        case let error as BalancerError:
            switch error {
            case .overloaded, .queueTimeout, .shuttingDown, .unavailable, .busy:
                self.init(
                    status: .serviceUnavailable,
                    code: error.code,
                    message: error.description,
                    headers: [("retry-after", String(APIError.retryAfterSeconds))]
                )
            case .replicasOutOfRange(let requested, let activeWorkers):
                // The range depends on the workers active when the job arrives,
                // so the balancer checks it; to the client it is a bad field.
                self.init(
                    status: .badRequest,
                    code: "bad_field",
                    message: "field \"replicas\" must be from 1 to \(activeWorkers) (the active workers); got \(requested)"
                )
            case .cancelled:
                // Only when the client has gone: nobody reads this answer.
                self.init(status: .custom(code: 499, reasonPhrase: "Client Closed Request"), code: error.code, message: error.description)
            }
        case let error as JobError:
            switch error {
            case .badField(let field, let problem):
                self.init(status: .badRequest, code: "bad_field", message: "field \"\(field)\" \(problem)")
            case .unknownOp(let op):
                self.init(
                    status: .badRequest,
                    code: "unknown_op",
                    message: "field \"op\": unknown op \"\(op)\"; use one of \(JobRegistry.builtIn.ops.joined(separator: ", "))"
                )
            case .badJSON(let reason):
                self.init(status: .badRequest, code: "bad_json", message: reason)
            case .overflow(let reason):
                self.init(status: .unprocessableEntity, code: "overflow", message: reason)
            }
        case let error as UpstreamError:
            // 502 for a backend that failed, 504 for one too slow; the message
            // names it and says whether the failure allowed another try.
            let tries =
                error.kind.retry == .never
                ? "not tried again: the backend may have acted on the request"
                : "the request was tried on every backend it could be"
            self.init(status: error.kind.suggestedStatus ?? .badGateway, code: error.kind.rawValue, message: "\(error); \(tries)")
        case let error as UpstreamPool.ChangeError:
            switch error {
            case .unknownBackend(let name):
                self.init(status: .notFound, code: "unknown_backend", message: "no backend is named \"\(name)\"; GET /admin/backends lists them")
            case .unknownPool(let name):
                self.init(status: .notFound, code: "unknown_pool", message: "no upstream pool is named \"\(name)\"")
            case .nameTaken(let name):
                self.init(status: .conflict, code: "backend_exists", message: "a backend named \"\(name)\" exists already; names are unique across pools")
            case .removing(let name):
                self.init(status: .conflict, code: "backend_removing", message: "backend \"\(name)\" is being removed")
            }
        case let error as ConfigurationError:
            self.init(status: .badRequest, code: "bad_field", message: error.message)
        case let error as BackendURLError:
            self.init(status: .badRequest, code: "bad_field", message: "\(error)")
        case let error as JSONParseError:
            self.init(status: .badRequest, code: "bad_json", message: "the body is not valid JSON: \(error)")
        case is CancellationError:
            self.init(status: .custom(code: 499, reasonPhrase: "Client Closed Request"), code: "cancelled", message: "the request was cancelled")
        default:
            self.init(status: .internalServerError, code: "job_failed", message: "the job failed: \(error)")
        }
    }

    // MARK: - The table's fixed answers

    static func notFound(_ path: Substring) -> APIError {
        APIError(status: .notFound, code: "not_found", message: "no route for \(path); try POST /jobs, GET /stats, /dashboard, /metrics, /healthz or /readyz")
    }

    static func methodNotAllowed(_ method: HTTPMethod, _ path: Substring, allow: String) -> APIError {
        APIError(
            status: .methodNotAllowed,
            code: "method_not_allowed",
            message: "\(method.rawValue) is not allowed on \(path); use \(allow)",
            headers: [("allow", allow)]
        )
    }

    static let headerTimeout = APIError(
        status: .requestTimeout,
        code: "request_timeout",
        message: "the request headers did not arrive in time; send the whole head promptly"
    )

    static let bodyTimeout = APIError(
        status: .requestTimeout,
        code: "request_timeout",
        message: "the request body did not arrive in time; send the whole body promptly"
    )

    static func bodyTooLarge(limit: Int) -> APIError {
        APIError(
            status: .payloadTooLarge,
            code: "body_too_large",
            message: "the request body is over the limit of \(limit) bytes (max_body_bytes)"
        )
    }

    static func headersTooLarge(limit: Int) -> APIError {
        APIError(
            status: .requestHeaderFieldsTooLarge,
            code: "headers_too_large",
            message: "the request headers are over the limit of \(limit) bytes (max_header_bytes)"
        )
    }

    static func badRequest(_ reason: String) -> APIError {
        APIError(status: .badRequest, code: "bad_request", message: reason)
    }

    static let jobTimeout = APIError(
        status: .gatewayTimeout,
        code: "job_timeout",
        message: "the job did not finish within its timeout_ms and was cancelled; raise timeout_ms or ask for less work"
    )

    static let tooManyConnections = APIError(
        status: .serviceUnavailable,
        code: "too_many_connections",
        message: "the server is at its max_connections; retry later",
        headers: [("retry-after", String(APIError.retryAfterSeconds))]
    )

    /// Every backend is out (ejected or down) after `failure`: 503, naming the backend that failed.
    static func noHealthyBackend(after failure: UpstreamError) -> APIError {
        APIError(
            status: .serviceUnavailable,
            code: "no_healthy_backend",
            message: "no healthy backend is left: \(failure)",
            headers: [("retry-after", String(APIError.retryAfterSeconds))]
        )
    }

    static let notReady = APIError(
        status: .serviceUnavailable,
        code: "draining",
        message: "the server is shutting down and takes no new work",
        headers: [("retry-after", String(APIError.retryAfterSeconds))]
    )

    /// The JSON body.
    func body(allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64 + message.utf8.count)
        buffer.writeStaticString("{\"error\":")
        buffer.writeJSONString(code)
        buffer.writeStaticString(",\"message\":")
        buffer.writeJSONString(message)
        buffer.writeStaticString("}\n")
        return buffer
    }
}

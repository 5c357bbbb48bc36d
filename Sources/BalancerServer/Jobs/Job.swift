/// A kind of work `POST /jobs` can run on the balancer's workers.
///
/// One op is one small type conforming to this protocol, in its own file, and
/// one line in ``JobRegistry/builtIn``. The type reads and checks its fields
/// when the request is decoded (so a bad field is a 400 before anything is
/// queued); ``run()`` is the operation a worker runs.
public protocol Job: Sendable {
    /// The value of `"op"` that selects this job type.
    static var op: String { get }
    /// Reads the job's fields from the request body.
    /// - Throws: ``JobError/badField(_:_:)`` naming the field.
    init(fields: JSONObject, limits: JobLimits) throws(JobError)
    /// Does the work on a worker and returns the `result`. Long work must
    /// honour task cancellation (a job timeout, a client that went away).
    func run() async throws -> JSONValue
}

/// Bounds the server puts on jobs, from its configuration.
public struct JobLimits: Sendable, Equatable {
    /// The most milliseconds a `sleep` or `spin` job may ask for.
    public var maxJobMilliseconds: Int64

    public init(maxJobMilliseconds: Int64 = 10_000) {
        self.maxJobMilliseconds = maxJobMilliseconds
    }
}

/// Why a job could not be decoded or did not produce a value.
public enum JobError: Error, Sendable, Equatable {
    /// A field is missing or has a bad value: (field, what is wrong).
    case badField(String, String)
    /// `"op"` names no known job.
    case unknownOp(String)
    /// The body is not JSON.
    case badJSON(String)
    /// The arithmetic result does not fit the result type.
    case overflow(String)
}

/// The job types `POST /jobs` knows, by op name.
public struct JobRegistry: Sendable {
    private var types: [String: any Job.Type]

    /// multiply, sleep, spin and echo.
    public static let builtIn = JobRegistry([MultiplyJob.self, SleepJob.self, SpinJob.self, EchoJob.self])

    public init(_ types: [any Job.Type]) {
        self.types = Dictionary(types.map { ($0.op, $0) }, uniquingKeysWith: { _, last in last })
    }

    /// Op names, sorted.
    public var ops: [String] { types.keys.sorted() }

    /// Decodes a job body: `{"op": ..., fields..., "timeout_ms": optional, "replicas": optional}`.
    public func decode(_ body: JSONValue, limits: JobLimits) throws(JobError) -> DecodedJob {
        guard case .object(let fields) = body else {
            throw .badJSON("the body must be a JSON object such as {\"op\":\"multiply\",\"x\":6,\"y\":7}, not \(body.typeName)")
        }
        guard let opValue = fields["op"] else {
            throw .badField("op", "is missing; one of \(ops.joined(separator: ", ")) is required")
        }
        guard case .string(let op) = opValue else {
            throw .badField("op", "must be a string, not \(opValue.typeName)")
        }
        guard let type = types[op] else { throw .unknownOp(op) }
        let job = try type.init(fields: fields, limits: limits)
        var timeout: Duration?
        if let value = fields["timeout_ms"] {
            guard let ms = value.int64, ms >= 1 else {
                throw .badField("timeout_ms", "must be a whole number of milliseconds, 1 or more")
            }
            timeout = .milliseconds(ms)
        }
        var replicas: Int?
        if let value = fields["replicas"] {
            // The upper bound is the workers active when the job arrives: the balancer checks the range.
            guard let count = value.int64 else {
                throw .badField("replicas", "must be a whole number from 1 to the number of active workers")
            }
            replicas = Int(count)
        }
        return DecodedJob(op: type.op, job: job, timeout: timeout, replicas: replicas)
    }
}

/// A job ready to submit, with its optional timeout.
public struct DecodedJob: Sendable {
    public var op: String
    public var job: any Job
    /// From `timeout_ms`: past it the answer is 504 and a running job is cancelled.
    public var timeout: Duration?
    /// From `replicas`: run as this many copies on distinct workers, the first
    /// answer wins (``Balancer/submitReplicated(replicas:_:)``).
    public var replicas: Int?
}

extension JSONObject {
    /// A required integer field that fits `Int64`.
    func requiredInt64(_ name: String) throws(JobError) -> Int64 {
        guard let value = self[name] else { throw .badField(name, "is missing; an integer is required") }
        guard let int = value.int64 else {
            if case .number = value {
                throw .badField(name, "must be an integer from \(Int64.min) to \(Int64.max)")
            }
            throw .badField(name, "must be an integer, not \(value.typeName)")
        }
        return int
    }

    /// A required duration field in milliseconds, from 0 up to the configured maximum.
    func requiredMilliseconds(_ name: String, limits: JobLimits) throws(JobError) -> Int64 {
        let ms = try requiredInt64(name)
        guard ms >= 0, ms <= limits.maxJobMilliseconds else {
            throw .badField(name, "must be from 0 to \(limits.maxJobMilliseconds) (the server's max_job_ms), got \(ms)")
        }
        return ms
    }
}

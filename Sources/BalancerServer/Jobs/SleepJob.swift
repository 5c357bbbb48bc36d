/// `{"op":"sleep","ms":300}`: I/O-like work (the talk's `op()`); the worker
/// waits without using a CPU. Returns the milliseconds slept.
public struct SleepJob: Job {
    public static let op = "sleep"
    public var milliseconds: Int64

    public init(fields: JSONObject, limits: JobLimits) throws(JobError) {
        milliseconds = try fields.requiredMilliseconds("ms", limits: limits)
    }

    public func run() async throws -> JSONValue {
        try await Task.sleep(for: .milliseconds(milliseconds))
        return JSONValue(milliseconds)
    }
}

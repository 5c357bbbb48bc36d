/// `{"op":"echo","value":<any JSON>}` → `value`, unchanged.
public struct EchoJob: Job {
    public static let op = "echo"
    public var value: JSONValue

    public init(fields: JSONObject, limits: JobLimits) throws(JobError) {
        guard let value = fields["value"] else { throw .badField("value", "is missing; any JSON value is accepted") }
        self.value = value
    }

    public func run() async throws -> JSONValue {
        value
    }
}

/// `{"op":"multiply","x":6,"y":7}` → `42`: the talk's `Work{x, y, z}`.
///
/// Int64 overflow is an error (422 `overflow`), never a trap.
public struct MultiplyJob: Job {
    public static let op = "multiply"
    public var x: Int64
    public var y: Int64

    public init(fields: JSONObject, limits: JobLimits) throws(JobError) {
        x = try fields.requiredInt64("x")
        y = try fields.requiredInt64("y")
    }

    public func run() async throws -> JSONValue {
        let (product, overflow) = x.multipliedReportingOverflow(by: y)
        if overflow {
            throw JobError.overflow("\(x) × \(y) does not fit in a signed 64-bit integer")
        }
        return JSONValue(product)
    }
}

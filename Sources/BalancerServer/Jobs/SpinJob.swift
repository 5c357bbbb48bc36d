/// `{"op":"spin","ms":50}`: CPU-bound busy work for `ms` milliseconds.
/// Returns the number of loop rounds done.
///
/// It checks for cancellation between rounds and yields its thread about
/// every millisecond, so a cancelled or timed-out job stops at once and a
/// spinning worker cannot starve the server's other tasks on a small machine.
public struct SpinJob: Job {
    public static let op = "spin"
    public var milliseconds: Int64

    public init(fields: JSONObject, limits: JobLimits) throws(JobError) {
        milliseconds = try fields.requiredMilliseconds("ms", limits: limits)
    }

    public func run() async throws -> JSONValue {
        let clock = ContinuousClock()
        let end = clock.now + .milliseconds(milliseconds)
        var rounds: Int64 = 0
        var sink: UInt64 = 0x9E37_79B9_7F4A_7C15
        var nextYield = clock.now + .milliseconds(1)
        while true {
            try Task.checkCancellation()
            let now = clock.now
            if now >= end { break }
            for _ in 0..<1_000 {
                sink = sink &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            }
            rounds += 1
            if now >= nextYield {
                await Task.yield()
                nextYield = now + .milliseconds(1)
            }
        }
        // Keeps the optimizer from deleting the loop.
        if sink == 0 { rounds += 1 }
        return JSONValue(rounds)
    }
}

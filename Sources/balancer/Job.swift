import ArgumentParser
import BalancerServer

/// `balancer job OP key=value...`: posts one job to a running server and
/// prints its answer.
struct JobCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "job",
        abstract: "Post one job to a running server and print the answer, e.g. `balancer job multiply x=6 y=7`.",
        discussion: """
            Sends {"op": OP, KEY: VALUE, ...} to POST /jobs. A VALUE that is a JSON number, true, false, \
            an object or an array is sent as that JSON value; anything else as a string. Prints the result, the \
            worker that ran it and the time it spent queued and running; an error prints the server's message \
            and exits 1.
            """
    )

    @Argument(help: "The job type: multiply, sleep, spin, echo.")
    var op: String

    @Argument(help: ArgumentHelp("The job's fields.", valueName: "key=value"))
    var fields: [String] = []

    @OptionGroup var server: ServerAddress

    @Flag(help: "Print the server's JSON answer as it came.")
    var json = false

    @Option(help: "Give up when there is no answer within this many milliseconds.")
    var timeoutMs = 60_000

    func validate() throws {
        guard timeoutMs > 0 else { throw ValidationError("--timeout-ms must be positive") }
        for field in fields where !field.contains("=") {
            throw ValidationError("'\(field)' is not key=value")
        }
    }

    /// The request body: `op`, then each field in the order given.
    var body: JSONValue {
        var object = JSONObject([("op", .string(op))])
        for field in fields {
            let key = String(field.prefix { $0 != "=" })
            let text = String(field.dropFirst(key.count + 1))
            let value: JSONValue
            switch try? JSONParser.parse(Array(text.utf8)) {
            case let parsed? where parsed.string == nil && parsed != .null: value = parsed
            default: value = .string(text)
            }
            object.members.append((key, value))
        }
        return .object(object)
    }

    func run() async throws {
        let client = try server.client(timeout: .milliseconds(timeoutMs))
        let response: HTTPClientResponse
        do {
            response = try await client.send(.post("/jobs", json: body.description))
        } catch {
            printError("balancer job: \(error)")
            throw ExitCode.failure
        }
        guard response.status.code == 200 else {
            printError("balancer job: \(errorMessage(of: response))")
            throw ExitCode.failure
        }
        if json {
            print(response.text, terminator: response.text.hasSuffix("\n") ? "" : "\n")
            return
        }
        guard let answer = try? JSONParser.parse(response.body), let result = answer["result"] else {
            printError("balancer job: the answer is not a job result: \(response.text)")
            throw ExitCode.failure
        }
        var line = "result \(result)"
        if let worker = answer["worker"]?.int { line += "  worker \(worker)" }
        if let queued = answer["queued_us"]?.int { line += "  queued \(queued) µs" }
        if let ran = answer["run_us"]?.int { line += "  run \(ran) µs" }
        print(line)
    }
}

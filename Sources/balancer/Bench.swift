import ArgumentParser
import BalancerCore

/// `balancer bench --in-process`: the cost of the balancer itself, with the
/// talk's closed loop of requesters and trivial work.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure the balancer's own throughput: requesters looping submit with trivial work.",
        discussion: "The last line printed is \"<N> requests/s\"."
    )

    @Flag(name: .customLong("in-process"), help: "Run the balancer in this process, without HTTP (the only mode).")
    var inProcess = false

    @Option(help: "Workers in the pool.")
    var workers = 8

    @Option(help: "Concurrent requesters, each submitting in a closed loop.")
    var requesters = 64

    @Option(help: "How long to run, in seconds.")
    var seconds: Double = 3

    @Option(help: "Requests a worker may hold (C).")
    var capacity = 16

    @Option(help: "Worker-selection strategy: \(Strategy.allCases.map(\.rawValue).joined(separator: ", ")).")
    var strategy: Strategy = .leastLoaded

    func validate() throws {
        guard inProcess else { throw ValidationError("only --in-process is supported: pass --in-process") }
        guard workers >= 1 else { throw ValidationError("--workers must be 1 or more") }
        guard requesters >= 1 else { throw ValidationError("--requesters must be 1 or more") }
        guard seconds > 0 else { throw ValidationError("--seconds must be above zero") }
        guard capacity >= 1 else { throw ValidationError("--capacity must be 1 or more") }
    }

    func run() async throws {
        let balancer = Balancer(
            configuration: .init(
                workers: workers,
                capacity: capacity,
                backlog: max(1024, requesters),
                queueTimeout: .seconds(60),
                strategy: strategy
            )
        )
        let result = try await InProcessBench.run(
            balancer: balancer,
            requesters: requesters,
            duration: .milliseconds(Int64(seconds * 1000))
        )
        let stats = await balancer.stats()
        print("workers \(workers), requesters \(requesters), strategy \(strategy.rawValue), capacity \(stats.capacity)")
        print("requests \(result.requests), errors \(result.errors), elapsed \(result.elapsed)")
        print("per worker completed: \(stats.workers.map { String($0.completed) }.joined(separator: " "))")
        print("\(Int(result.requestsPerSecond)) requests/s")
    }
}

extension Strategy: ExpressibleByArgument {}

import ArgumentParser

/// The `balancer` command line: a thin layer over BalancerServer and BalancerCore.
@main
struct BalancerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "balancer",
        abstract: "A least-pending HTTP load balancer: Rob Pike's balancer from \"Concurrency is not Parallelism\".",
        subcommands: [Serve.self, JobCommand.self, StatsCommand.self, Healthcheck.self, Bench.self, ExperimentCommand.self]
    )
}

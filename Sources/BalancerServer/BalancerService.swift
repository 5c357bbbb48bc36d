import BalancerCore
import ServiceLifecycle

/// Runs a ``Balancer``'s `run()` loop as a service in the `ServiceGroup`.
///
/// Put it before the ``HTTPServer`` in the group, so the server (which starts
/// the balancer's drain itself) shuts down first and the balancer last.
/// Graceful shutdown of this service asks the balancer to finish what it has;
/// cancellation stops it at once.
public struct BalancerService: Service {
    public let balancer: Balancer
    /// How long queued and running jobs get once shutdown starts.
    public let gracePeriod: Duration

    public init(balancer: Balancer, gracePeriod: Duration) {
        self.balancer = balancer
        self.gracePeriod = gracePeriod
    }

    public func run() async throws {
        let balancer = self.balancer
        let gracePeriod = self.gracePeriod
        await withGracefulShutdownHandler {
            await balancer.run()
        } onGracefulShutdown: {
            balancer.shutdown(gracePeriod: gracePeriod)
        }
        // The server may drain the balancer before this service's turn comes:
        // stay up until the group shuts this service down, so the group does
        // not see it end early.
        try? await gracefulShutdown()
    }
}

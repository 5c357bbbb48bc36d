import ArgumentParser
import BalancerServer

/// `balancer healthcheck`: GET /healthz on the local server; exit 0 if it
/// answers 200, 1 otherwise. For a container's HEALTHCHECK, where there is no curl.
///
/// The port comes from the same layers as `serve` (flag, BALANCER_PORT or
/// BALANCER_ADMIN_PORT, the BALANCER_CONFIG file), so it finds the server
/// that the container runs: the admin port when one is set.
struct Healthcheck: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check that the local server answers GET /healthz with 200 (exit 0), else exit 1."
    )

    @Option(help: "Server address; 0.0.0.0 means this machine. [default: the server's host setting]")
    var host: String?

    @Option(help: "Server port. [default: the server's port setting]")
    var port: String?

    @Option(help: "Path to GET.")
    var path = "/healthz"

    @Option(help: "Give up when there is no connection, or no answer, within this many milliseconds.")
    var timeoutMs = 2_000

    func validate() throws {
        guard timeoutMs > 0 else { throw ValidationError("--timeout-ms must be positive") }
    }

    func run() async throws {
        var flags: [String: String] = [:]
        if let host { flags["host"] = host }
        if let port { flags["port"] = port }
        let configuration: ServerConfiguration
        do {
            configuration = try loadConfiguration(flags: flags, configPath: nil)
        } catch {
            printError("balancer healthcheck: \(error)")
            throw ExitCode(2)
        }
        let target: String =
            switch configuration.host {
            case "0.0.0.0", "*": "127.0.0.1"
            case "::", "[::]": "::1"
            case let host: host
            }
        // With admin_port, /healthz is on the admin listener; --port still picks any port.
        let (key, port) =
            switch (self.port, configuration.adminPort) {
            case (nil, let adminPort?): ("admin_port", adminPort)
            default: ("port", configuration.port)
            }
        guard port != 0 else {
            printError("balancer healthcheck: \(key) is 0 (any free port), so there is no port to check: pass the server's port with --port")
            throw ExitCode(2)
        }
        let address = target.contains(":") ? "[\(target)]:\(port)" : "\(target):\(port)"
        let client: HTTPClient
        do {
            client = try HTTPClient(url: "http://\(address)", configuration: .init(timeout: .milliseconds(timeoutMs)))
        } catch {
            printError("balancer healthcheck: \(error)")
            throw ExitCode(2)
        }
        let response: HTTPClientResponse
        do {
            response = try await client.send(.get(path))
        } catch {
            printError("balancer healthcheck: GET \(path) on \(address) failed: \(error.kind.rawValue): \(error.detail)")
            throw ExitCode(1)
        }
        guard response.status.code == 200 else {
            printError("balancer healthcheck: GET \(path) on \(address) answered \(response.status.code)")
            throw ExitCode(1)
        }
        print("ok: GET \(path) on \(address) answered 200")
    }
}

import ArgumentParser
import BalancerServer

/// `--url`, shared by the subcommands that talk to a running server.
struct ServerAddress: ParsableArguments {
    @Option(help: ArgumentHelp("The server: http://host:port[/prefix].", valueName: "url"))
    var url = "http://127.0.0.1:8080"

    /// A client for ``url``; a URL it cannot use is a usage error.
    func client(timeout: Duration) throws -> HTTPClient {
        do {
            return try HTTPClient(url: url, configuration: .init(timeout: timeout))
        } catch {
            throw ValidationError("--url: \(error.reason)")
        }
    }
}

/// The message of a server's JSON error body (`{"error":..., "message":...}`),
/// or its status and text when it is not one.
func errorMessage(of response: HTTPClientResponse) -> String {
    let body = try? JSONParser.parse(response.body)
    if let code = body?["error"]?.string, let message = body?["message"]?.string {
        return "\(code): \(message)"
    }
    return "HTTP \(response.status.code): \(response.text)"
}

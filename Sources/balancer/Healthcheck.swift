import ArgumentParser
import BalancerServer
import NIOCore
import NIOPosix

/// `balancer healthcheck`: GET /healthz on the local server; exit 0 if it
/// answers 200, 1 otherwise. For a container's HEALTHCHECK, where there is no curl.
///
/// The port comes from the same layers as `serve` (flag, BALANCER_PORT, the
/// BALANCER_CONFIG file), so it finds the server that the container runs.
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

    @Option(help: "Give up after this many milliseconds.")
    var timeoutMs = 2_000

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
        let timeout = Duration.milliseconds(timeoutMs)
        let path = self.path
        let port = configuration.port
        do {
            let status = try await withThrowingTaskGroup(of: Int?.self) { group in
                group.addTask { try await getStatus(host: target, port: port, path: path) }
                group.addTask {
                    try await Task.sleep(for: timeout)
                    return nil
                }
                defer { group.cancelAll() }
                return try await group.next() ?? nil
            }
            guard let status else {
                printError("balancer healthcheck: no answer from \(target):\(port) within \(timeoutMs) ms")
                throw ExitCode(1)
            }
            guard status == 200 else {
                printError("balancer healthcheck: GET \(path) on \(target):\(port) answered \(status)")
                throw ExitCode(1)
            }
            print("ok: GET \(path) on \(target):\(port) answered 200")
        } catch let exit as ExitCode {
            throw exit
        } catch {
            printError("balancer healthcheck: cannot reach \(target):\(port): \(error)")
            throw ExitCode(1)
        }
    }
}

/// Sends one HTTP/1.1 GET over a plain TCP connection and returns the status code.
private func getStatus(host: String, port: Int, path: String) async throws -> Int? {
    let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .connectTimeout(.seconds(2))
        .connect(host: host, port: port) { channel in
            channel.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
            }
        }
    return try await channel.executeThenClose { inbound, outbound in
        try await outbound.write(
            ByteBuffer(string: "GET \(path) HTTP/1.1\r\nHost: \(host):\(port)\r\nConnection: close\r\n\r\n")
        )
        var received = ByteBuffer()
        for try await var chunk in inbound {
            received.writeBuffer(&chunk)
            // "HTTP/1.1 200 ": the status is known once the first line is in.
            if let line = received.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) {
                let first = String(decoding: received.readableBytesView[..<line], as: UTF8.self)
                let fields = first.split(separator: " ")
                return fields.count >= 2 ? Int(fields[1]) : nil
            }
        }
        return nil
    }
}

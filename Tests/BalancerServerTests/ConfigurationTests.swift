import BalancerCore
import BalancerServer
import NIOCore
import Testing

@Suite("Configuration layers")
struct ConfigurationTests {
    private func file(_ text: String) -> (path: String, contents: ByteBuffer) {
        ("test.json", ByteBuffer(string: text))
    }

    @Test("with nothing given, the documented defaults")
    func defaults() throws {
        let configuration = try ServerConfiguration.load()
        #expect(configuration.host == "127.0.0.1")
        #expect(configuration.port == 8080)
        #expect(configuration.workers == 8)
        #expect(configuration.capacity == 16)
        #expect(configuration.backlog == 1024)
        #expect(configuration.queueTimeoutMilliseconds == 5_000)
        #expect(configuration.strategy == .leastLoaded)
        #expect(configuration.maxBodyBytes == 1 << 20)
        #expect(configuration.gracePeriodMilliseconds == 30_000)
    }

    @Test("flags beat the environment, which beats the file, which beats the defaults")
    func precedence() throws {
        let configuration = try ServerConfiguration.load(
            flags: ["port": "1001"],
            environment: ["BALANCER_PORT": "2002", "BALANCER_WORKERS": "3", "PATH": "/bin"],
            file: file(#"{"port": 3003, "workers": 4, "capacity": 5, "strategy": "round-robin"}"#)
        )
        #expect(configuration.port == 1001)
        #expect(configuration.workers == 3)
        #expect(configuration.capacity == 5)
        #expect(configuration.strategy == .roundRobin)
        #expect(configuration.backlog == 1024)
    }

    @Test("send_timeout_ms: 60000 by default, from each layer; 0 is refused")
    func sendTimeout() throws {
        #expect(try ServerConfiguration.load().sendTimeoutMilliseconds == 60_000)
        let fromFile = file(#"{"send_timeout_ms": 1500}"#)
        #expect(try ServerConfiguration.load(file: fromFile).sendTimeoutMilliseconds == 1_500)
        let environment = ["BALANCER_SEND_TIMEOUT_MS": "2500"]
        #expect(try ServerConfiguration.load(environment: environment, file: fromFile).sendTimeoutMilliseconds == 2_500)
        #expect(try ServerConfiguration.load(flags: ["send_timeout_ms": "3500"], environment: environment).sendTimeoutMilliseconds == 3_500)
        #expect(ServerConfiguration.keys.first { $0.name == "send_timeout_ms" }?.flag == "--send-timeout-ms")
        #expect(throws: ConfigurationError.self) { try ServerConfiguration.load(flags: ["send_timeout_ms": "0"]) }
    }

    @Test("an unknown key or a bad value is refused with a message naming the key", arguments: [
        (["porrt": "1"], [:], nil, "porrt"),
        ([:], ["BALANCER_PROT": "1"], nil, "BALANCER_PROT"),
        ([:], [:], #"{"wokers": 2}"#, "wokers"),
        (["port": "http"], [:], nil, "--port"),
        (["port": "70000"], [:], nil, "port"),
        ([:], ["BALANCER_WORKERS": "0"], nil, "BALANCER_WORKERS"),
        ([:], [:], #"{"strategy": "random"}"#, "strategy"),
        ([:], [:], #"{"queue_timeout_ms": "5s"}"#, "queue_timeout_ms"),
        ([:], [:], #"{"host": 1}"#, "host"),
        ([:], [:], #"{"log_level": "loud"}"#, "log_level"),
        ([:], [:], #"[1]"#, "test.json"),
        ([:], [:], #"{"port": 1"#, "test.json"),
    ] as [([String: String], [String: String], String?, String)])
    func refused(flags: [String: String], environment: [String: String], fileText: String?, named: String) {
        do {
            _ = try ServerConfiguration.load(flags: flags, environment: environment, file: fileText.map(file))
            Issue.record("expected an error naming \(named)")
        } catch {
            #expect(error.message.contains(named), "\(error.message) should name \(named)")
        }
    }

    @Test("the printed configuration is a config file that loads back to the same values")
    func roundTrip() throws {
        var changed = try ServerConfiguration.load(flags: ["workers": "5", "strategy": "power-of-two", "log_level": "debug"])
        changed.host = "0.0.0.0"
        let printed = changed.prettyJSON
        let loaded = try ServerConfiguration.load(file: file(printed))
        #expect(loaded == changed)
    }

    @Test("every key has a distinct environment variable and flag")
    func keyNames() {
        let keys = ServerConfiguration.keys
        #expect(Set(keys.map(\.environmentVariable)).count == keys.count)
        #expect(keys.first { $0.name == "queue_timeout_ms" }?.environmentVariable == "BALANCER_QUEUE_TIMEOUT_MS")
        #expect(keys.first { $0.name == "queue_timeout_ms" }?.flag == "--queue-timeout-ms")
    }
}

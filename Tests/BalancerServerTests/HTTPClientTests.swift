import BalancerServer
import Foundation
import NIOCore
import NIOHTTP1
import Testing

@Suite("HTTP client")
struct HTTPClientTests {
    @Test func parsesBaseURLs() throws {
        let plain = try HTTPBaseURL("http://127.0.0.1:8080")
        #expect(plain.host == "127.0.0.1" && plain.port == 8080 && plain.prefix == "")
        #expect(plain.target("/stats") == "/stats")
        let prefixed = try HTTPBaseURL(" http://lb.internal/api/v1/ ")
        #expect(prefixed.host == "lb.internal" && prefixed.port == 80 && prefixed.prefix == "/api/v1")
        #expect(prefixed.target("/jobs") == "/api/v1/jobs" && prefixed.hostHeader == "lb.internal")
        let v6 = try HTTPBaseURL("http://[::1]:9000/")
        #expect(v6.host == "::1" && v6.port == 9000 && v6.prefix == "" && v6.hostHeader == "[::1]:9000")
        #expect(v6.authority == "[::1]:9000")
    }

    @Test(arguments: [
        ("127.0.0.1:8080", "expected http://"),
        ("https://127.0.0.1", "https"),
        ("ftp://host", "scheme"),
        ("http://", "host is missing"),
        ("http:///stats", "host is missing"),
        ("http://host:0", "port"),
        ("http://host:99999", "port"),
        ("http://host/stats?format=text", "query"),
        ("http://host#top", "fragment"),
        ("http://user@host", "user info"),
        ("http://::1", "brackets"),
    ])
    func refusesOtherURLsWithAClearMessage(url: String, mentions: String) {
        let error = #expect(throws: HTTPBaseURLError.self) { try HTTPBaseURL(url) }
        #expect(error?.description.contains(mentions) == true, "\(String(describing: error))")
        #expect(error?.url == url)
    }

    @Test("a keep-alive connection sends requests one after another on one TCP connection")
    func keepAlive() async throws {
        let backend = try await UpstreamTestBackend.start()
        let client = try HTTPClient(url: "http://127.0.0.1:\(backend.port)")
        let answers = try await client.withConnection { connection in
            var answers: [HTTPClientResponse] = []
            for index in 0..<3 {
                var request = HTTPClientRequest.post("/echo?i=\(index)", json: #"{"n":\#(index)}"#)
                request.headers.add(name: "X-Test", value: "value-\(index)")
                answers.append(try await connection.send(request))
            }
            answers.append(try await connection.send(.get("/echo")))
            #expect(connection.isOpen)
            return answers
        }
        await backend.stop()
        #expect(answers.map(\.status) == [.ok, .ok, .ok, .ok])
        #expect(answers.map(\.text) == [#"{"n":0}"#, #"{"n":1}"#, #"{"n":2}"#, ""])
        #expect(answers.map { $0.headers["x-req-uri"].first } == ["/echo?i=0", "/echo?i=1", "/echo?i=2", "/echo"])
        #expect(answers.map { $0.headers["x-req-method"].first } == ["POST", "POST", "POST", "GET"])
        #expect(answers[1].headers["x-req-x-test"].first == "value-1")
        #expect(answers[0].headers["x-req-host"].first == "127.0.0.1:\(backend.port)")
        #expect(answers[0].headers["x-req-content-length"].first == "7")
        #expect(Set(answers.map { $0.headers["x-connection-id"].first }).count == 1)
        #expect(backend.connectionsAccepted == 1)
    }

    @Test("one-shot requests against the real server: a job, an error body, /stats")
    func oneShotAgainstTheServer() async throws {
        try await withServer { server in
            let client = try HTTPClient(url: "http://127.0.0.1:\(server.port)")
            let job = try await client.send(.post("/jobs", json: #"{"op":"multiply","x":6,"y":7}"#))
            #expect(job.status == .ok)
            let answer = try #require(try JSONSerialization.jsonObject(with: Data(job.text.utf8)) as? [String: Any])
            #expect(answer["result"] as? Int == 42)
            let bad = try await client.send(.post("/jobs", json: #"{"op":"multiply","x":6}"#))
            #expect(bad.status == .badRequest && bad.text.contains("bad_field"))
            let stats = try await client.send(.get("/stats"))
            #expect(stats.status == .ok && stats.text.contains(#""workers""#))
            let prefixed = try HTTPClient(url: "http://127.0.0.1:\(server.port)/api/")
            let notFound = try await prefixed.send(.get("/stats"))
            #expect(notFound.status == .notFound && notFound.text.contains("no route for /api/stats"), "\(notFound.text)")
        }
    }

    @Test("after Connection: close the connection is closed and says so")
    func connectionClose() async throws {
        let backend = try await UpstreamTestBackend.start()
        let client = try HTTPClient(url: "http://127.0.0.1:\(backend.port)")
        let error = try await client.withConnection { connection -> HTTPClientError? in
            let first = try await connection.send(.get("/close"))
            #expect(first.status == .ok)
            #expect(!connection.isOpen)
            do throws(HTTPClientError) {
                _ = try await connection.send(.get("/echo"))
                return nil
            } catch {
                return error
            }
        }
        await backend.stop()
        #expect(error?.kind == .connectionClosed)
    }

    @Test("a server that does not answer in time: timeout, and the connection is closed")
    func timeout() async throws {
        let backend = try await UpstreamTestBackend.start()
        let client = try HTTPClient(url: "http://127.0.0.1:\(backend.port)", configuration: .init(timeout: .milliseconds(200)))
        let error = await #expect(throws: HTTPClientError.self) { try await client.send(.get("/hang")) }
        #expect(error?.kind == .timeout, "\(String(describing: error))")
        await backend.stop()
    }

    @Test("truncated, invalid and oversized responses, and a refused connect, are typed errors")
    func failures() async throws {
        let backend = try await UpstreamTestBackend.start()
        let client = try HTTPClient(
            url: "http://127.0.0.1:\(backend.port)",
            configuration: .init(timeout: .seconds(10), maxResponseBodyBytes: 1_000)
        )
        let truncated = await #expect(throws: HTTPClientError.self) { try await client.send(.get("/truncate")) }
        #expect(truncated?.kind == .connectionClosed, "\(String(describing: truncated))")
        let large = await #expect(throws: HTTPClientError.self) { try await client.send(.get("/bytes?n=5000")) }
        #expect(large?.kind == .bodyTooLarge, "\(String(describing: large))")
        let small = try await client.send(.get("/bytes?n=1000"))
        #expect(small.body.readableBytes == 1_000)
        await backend.stop()

        let garbage = try await UpstreamTestBackend.start(mode: .garbage)
        let invalid = await #expect(throws: HTTPClientError.self) {
            try await HTTPClient(url: "http://127.0.0.1:\(garbage.port)").send(.get("/"))
        }
        #expect(invalid?.kind == .invalidResponse, "\(String(describing: invalid))")
        await garbage.stop()

        // Nothing listens on port 1 (a freed ephemeral port may be taken again by then).
        let refused = await #expect(throws: HTTPClientError.self) { try await HTTPClient(url: "http://127.0.0.1:1").send(.get("/")) }
        #expect(refused?.kind == .connectFailed, "\(String(describing: refused))")
    }

    @Test("cancelling the requesting task ends the request at once")
    func cancellation() async throws {
        let backend = try await UpstreamTestBackend.start()
        let client = try HTTPClient(url: "http://127.0.0.1:\(backend.port)", configuration: .init(timeout: .seconds(30)))
        let task = Task { () -> HTTPClientError? in
            do throws(HTTPClientError) {
                _ = try await client.send(.get("/hang"))
                return nil
            } catch {
                return error
            }
        }
        // Cancelled once the request is at the server, not while connecting.
        #expect(try await eventually { backend.requestsReceived == 1 })
        task.cancel()
        let error = await task.value
        #expect(error?.kind == .cancelled, "\(String(describing: error))")
        await backend.stop()
    }
}

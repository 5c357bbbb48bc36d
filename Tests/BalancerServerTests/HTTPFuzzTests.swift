@testable import BalancerCore
import BalancerServer
import Foundation
import NIOCore
import Testing

@Suite("HTTP fuzz")
struct HTTPFuzzTests {
    /// Seeded mutations of valid requests (flipped, inserted, deleted bytes,
    /// truncation), many connections at once: every connection ends in an
    /// answer or a close, and the server keeps serving others.
    @Test("mutated requests never stop the server")
    func mutatedRequests() async throws {
        let seeds = [
            "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 29\r\n\r\n{\"op\":\"multiply\",\"x\":6,\"y\":7}",
            "POST /jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n{\"op\":\"sleep\",\"ms\":1}\r\n0\r\n\r\n",
            "GET /stats?format=text HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
            "POST /jobs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 36\r\n\r\n{\"op\":\"echo\",\"value\":[1,{\"a\":null}]}",
        ].map { Array($0.utf8) }
        let alphabet = Array("\r\n :/?=&{}[]\",0123456789-abcxyzHTTP".utf8) + [0x00, 0x7F, 0xFF, 0x80]
        var rng = SplitMix64(seed: 0x4854_5450)
        var cases: [[UInt8]] = []
        for _ in 0..<160 {
            var bytes = seeds[Int(rng.next() % UInt64(seeds.count))]
            for _ in 0...(rng.next() % 3) {
                let position = Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 4 {
                case 0: bytes.remove(at: position)
                case 1: bytes.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: position)
                case 2: bytes[position] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                default: bytes = Array(bytes.prefix(max(1, position)))
                }
            }
            cases.append(bytes)
        }
        try await withServer({
            $0.headerTimeoutMilliseconds = 300
            $0.bodyTimeoutMilliseconds = 300
            $0.idleTimeoutMilliseconds = 300
            $0.maxJobMilliseconds = 50
        }) { server in
            let port = server.port
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (index, bytes) in cases.enumerated() {
                    if index >= 16 { try await group.next() }
                    group.addTask {
                        try? await withRawConnection(port: port) { connection in
                            var buffer = ByteBuffer()
                            buffer.writeBytes(bytes)
                            try await connection.send(buffer)
                            // An answer (any status) or a close; never a hang.
                            while let response = try await connection.readResponse() {
                                #expect((100...599).contains(response.status))
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            #expect(try await postJob(server, #"{"op":"multiply","x":6,"y":7}"#).status == 200)
            #expect(await server.balancer.stats().inFlight == 0)
        }
    }
}

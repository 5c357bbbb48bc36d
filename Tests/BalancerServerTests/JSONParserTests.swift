@testable import BalancerCore
import BalancerServer
import Foundation
import Testing

@Suite("JSON parser")
struct JSONParserTests {
    @Test("parses every kind of value and keeps number text and member order")
    func values() throws {
        let value = try JSONParser.parse(Array(#" {"b":[1,-0.5,2e10,true,false,null],"a":"x\u00e9\n\ud83d\ude00"} "#.utf8))
        let expected: JSONValue = .object([
            "b": .array([.number("1"), .number("-0.5"), .number("2e10"), .bool(true), .bool(false), .null]),
            "a": .string("xé\n😀"),
        ])
        #expect(value == expected)
        #expect(value.description == #"{"b":[1,-0.5,2e10,true,false,null],"a":"xé\n😀"}"#)
    }

    @Test("reads Int64 at its limits, and no further")
    func int64Limits() throws {
        #expect(try JSONParser.parse(Array("9223372036854775807".utf8)).int64 == .max)
        #expect(try JSONParser.parse(Array("-9223372036854775808".utf8)).int64 == .min)
        #expect(try JSONParser.parse(Array("9223372036854775808".utf8)).int64 == nil)
        #expect(try JSONParser.parse(Array("1.0".utf8)).int64 == nil)
    }

    @Test("rejects what RFC 8259 rejects", arguments: [
        "", " ", "{", "}", "[1,]", "{\"a\":1,}", "01", "1.", ".5", "-", "+1", "1e", "tru", "nul", "NaN",
        "\"abc", "\"\\x\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"a\u{01}b\"", "{a:1}", "[1 2]",
        "{\"a\" 1}", "1 2", "// c\n1", "[1]x", "\u{FEFF}1",
    ])
    func rejects(text: String) {
        #expect(throws: JSONParseError.self) { try JSONParser.parse(Array(text.utf8)) }
    }

    @Test("rejects invalid UTF-8 inside strings")
    func invalidUTF8() {
        #expect(throws: JSONParseError.self) { try JSONParser.parse([0x22, 0xC3, 0x28, 0x22]) }
        #expect(throws: JSONParseError.self) { try JSONParser.parse([0x22, 0xFF, 0x22]) }
    }

    @Test("deep nesting is refused, not a stack overflow")
    func depth() throws {
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        #expect(throws: JSONParseError.self) { try JSONParser.parse(Array(deep.utf8)) }
        let ok = String(repeating: "[", count: JSONParser.maxDepth) + String(repeating: "]", count: JSONParser.maxDepth)
        _ = try JSONParser.parse(Array(ok.utf8))
    }

    /// Differential fuzzing against Foundation's JSONSerialization: on random
    /// mutations of valid documents, both accept or both reject, and this
    /// parser never traps. Seeded, so a failure repeats.
    @Test("fuzz: agrees with JSONSerialization on mutated documents, never traps")
    func fuzz() throws {
        let seeds = [
            #"{"op":"multiply","x":6,"y":7}"#,
            #"{"op":"echo","value":{"a":[1,2.5,-3e-2,"s\"\\\/\b\f\n\r\t\u0041\u00e9"],"b":null,"c":true}}"#,
            #"[[],{},"",0,-0,1E+2,0.1,"\ud83d\ude00"]"#,
            #"{"op":"sleep","ms":300,"timeout_ms":1000}"#,
        ].map { Array($0.utf8) }
        let alphabet = Array(#"{}[]:,"\-+.eE0123456789truefalsnl \u"#.utf8) + [0x00, 0x1F, 0x7F, 0xC3, 0xA9, 0xFF, 0xED, 0xA0]
        var rng = SplitMix64(seed: 0xBA1A_9CE5)
        var disagreements: [String] = []
        for _ in 0..<20_000 {
            var bytes = seeds[Int(rng.next() % UInt64(seeds.count))]
            for _ in 0...(rng.next() % 4) {
                let position = bytes.isEmpty ? 0 : Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 4 {
                case 0 where !bytes.isEmpty: bytes.remove(at: position)
                case 1: bytes.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: position)
                case 2 where !bytes.isEmpty: bytes[position] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                default: bytes = Array(bytes.prefix(position))
                }
            }
            let ours = (try? JSONParser.parse(bytes)) != nil
            let foundation = (try? JSONSerialization.jsonObject(with: Data(bytes), options: .fragmentsAllowed)) != nil
            if ours != foundation, !knownDifference(bytes) {
                disagreements.append(String(decoding: bytes, as: UTF8.self))
            }
        }
        #expect(disagreements.isEmpty, "first disagreements: \(disagreements.prefix(5))")
    }

    /// Where this parser is deliberately stricter or Foundation is known to be lax.
    private func knownDifference(_ bytes: [UInt8]) -> Bool {
        // Foundation accepts lone surrogate escapes, some invalid UTF-8 and a
        // trailing comma before } or ]; RFC 8259 does not, nor does this parser.
        let text = String(decoding: bytes, as: UTF8.self)
        let squeezed = text.filter { !" \t\n\r".contains($0) }
        return text.contains("\\ud") || text.contains("\\uD") || String(validating: bytes, as: UTF8.self) == nil
            || bytes.contains(0x00) || squeezed.contains(",}") || squeezed.contains(",]")
    }
}

import BalancerCore
import NIOHTTP1
import Synchronization

/// `X-Request-Id`: the client's, if sane, or a new random 128-bit one in hex.
enum RequestID {
    static let headerName = "x-request-id"
    /// The longest client value kept.
    static let maxLength = 128

    /// The id for a request with these headers: the client's `X-Request-Id`
    /// when it is 1 to 128 bytes of printable ASCII, otherwise a new one.
    static func of(_ headers: HTTPHeaders) -> String {
        if let given = headers.first(name: headerName), isSane(given) { return given }
        return generate()
    }

    static func isSane(_ value: String) -> Bool {
        let bytes = value.utf8
        return !bytes.isEmpty && bytes.count <= maxLength && bytes.allSatisfy { (0x20...0x7E).contains($0) }
    }

    /// Seeded once from the system's generator, which costs a system call per number.
    private static let random = Mutex(SplitMix64(seed: UInt64.random(in: .min ... .max)))

    /// 32 lowercase hex digits: 128 random bits.
    static func generate() -> String {
        let (high, low) = random.withLock { ($0.next(), $0.next()) }
        let digits: StaticString = "0123456789abcdef"
        return String(unsafeUninitializedCapacity: 32) { buffer in
            for i in 0..<16 {
                buffer[i] = digits.utf8Start[Int(high >> (60 - 4 * UInt64(i)) & 0xF)]
                buffer[16 + i] = digits.utf8Start[Int(low >> (60 - 4 * UInt64(i)) & 0xF)]
            }
            return 32
        }
    }
}

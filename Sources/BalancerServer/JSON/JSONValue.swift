import NIOCore

/// A JSON value, as parsed from a request body or built for a response.
///
/// Numbers keep their literal text (already checked against JSON's grammar), so
/// `echo` gives back exactly what it was sent and no precision is lost on the
/// way; ``int64`` reads one as an integer when it is one.
/// Object members keep their order; a duplicated key keeps its last value.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    /// A number's literal text, valid JSON (e.g. `42`, `-1.5e3`).
    case number(String)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    /// An integer value.
    public init(_ value: Int64) { self = .number(String(value)) }
    /// An integer value.
    public init(_ value: Int) { self = .number(String(value)) }
    /// A floating-point value; NaN and infinities, which JSON cannot hold, become `null`.
    public init(_ value: Double) {
        self = value.isFinite ? .number(String(value)) : .null
    }

    /// The value as an `Int64`, if it is a number with no fraction or exponent that fits.
    public var int64: Int64? {
        guard case .number(let text) = self else { return nil }
        return Int64(text)
    }

    /// A short name of the value's JSON type, for error messages.
    public var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// A JSON object: its members in order.
public struct JSONObject: Sendable, Equatable {
    public var members: [(key: String, value: JSONValue)]

    public init(_ members: [(key: String, value: JSONValue)] = []) {
        self.members = members
    }

    /// The last value given for `key`, as JSON parsers commonly do.
    public subscript(key: String) -> JSONValue? {
        for member in members.reversed() where member.key == key {
            return member.value
        }
        return nil
    }

    public static func == (lhs: JSONObject, rhs: JSONObject) -> Bool {
        lhs.members.count == rhs.members.count
            && zip(lhs.members, rhs.members).allSatisfy { $0.key == $1.key && $0.value == $1.value }
    }
}

extension JSONObject: ExpressibleByDictionaryLiteral {
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self.members = elements.map { (key: $0.0, value: $0.1) }
    }
}

// MARK: - Writing

extension ByteBuffer {
    /// Appends `value` as compact JSON.
    @discardableResult
    public mutating func writeJSON(_ value: JSONValue) -> Int {
        let start = writerIndex
        appendJSON(value)
        return writerIndex - start
    }

    private mutating func appendJSON(_ value: JSONValue) {
        switch value {
        case .null: writeStaticString("null")
        case .bool(let b): _ = b ? writeStaticString("true") : writeStaticString("false")
        case .number(let text): writeString(text)
        case .string(let s): writeJSONString(s)
        case .array(let elements):
            writeInteger(UInt8(ascii: "["))
            for (i, element) in elements.enumerated() {
                if i > 0 { writeInteger(UInt8(ascii: ",")) }
                appendJSON(element)
            }
            writeInteger(UInt8(ascii: "]"))
        case .object(let object):
            writeInteger(UInt8(ascii: "{"))
            for (i, member) in object.members.enumerated() {
                if i > 0 { writeInteger(UInt8(ascii: ",")) }
                writeJSONString(member.key)
                writeInteger(UInt8(ascii: ":"))
                appendJSON(member.value)
            }
            writeInteger(UInt8(ascii: "}"))
        }
    }

    /// Appends `string` as a JSON string literal, escaping what JSON requires.
    public mutating func writeJSONString(_ string: String) {
        writeInteger(UInt8(ascii: "\""))
        var plainStart = string.utf8.startIndex
        var index = plainStart
        let utf8 = string.utf8
        while index != utf8.endIndex {
            let byte = utf8[index]
            if byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") {
                writeBytes(utf8[plainStart..<index])
                switch byte {
                case UInt8(ascii: "\""): writeStaticString("\\\"")
                case UInt8(ascii: "\\"): writeStaticString("\\\\")
                case 0x0A: writeStaticString("\\n")
                case 0x0D: writeStaticString("\\r")
                case 0x09: writeStaticString("\\t")
                default:
                    let hex: StaticString = "0123456789abcdef"
                    writeStaticString("\\u00")
                    writeInteger(hex.utf8Start[Int(byte >> 4)])
                    writeInteger(hex.utf8Start[Int(byte & 0xF)])
                }
                index = utf8.index(after: index)
                plainStart = index
            } else {
                index = utf8.index(after: index)
            }
        }
        writeBytes(utf8[plainStart..<utf8.endIndex])
        writeInteger(UInt8(ascii: "\""))
    }
}

extension JSONValue: CustomStringConvertible {
    /// Compact JSON text.
    public var description: String {
        var buffer = ByteBuffer()
        buffer.writeJSON(self)
        return String(buffer: buffer)
    }
}

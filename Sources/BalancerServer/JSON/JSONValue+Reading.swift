/// Reading parsed JSON by shape, for clients of the server's own answers
/// (`balancer stats`, `balancer job`): each accessor is nil when the value is
/// not of that shape, so a field that is absent or of another type reads as nil.
extension JSONValue {
    /// The member `key` of an object; nil for other values.
    public subscript(key: String) -> JSONValue? {
        guard case .object(let object) = self else { return nil }
        return object[key]
    }

    public var string: String? {
        guard case .string(let text) = self else { return nil }
        return text
    }

    public var array: [JSONValue]? {
        guard case .array(let items) = self else { return nil }
        return items
    }

    public var bool: Bool? {
        guard case .bool(let value) = self else { return nil }
        return value
    }

    /// The value as an `Int`, if it is a number with no fraction or exponent that fits.
    public var int: Int? { int64.flatMap { Int(exactly: $0) } }

    /// Any number, as a `Double`.
    public var double: Double? {
        guard case .number(let text) = self else { return nil }
        return Double(text)
    }
}

import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
private let systemWrite = Glibc.write
#elseif canImport(Musl)
import Musl
private let systemWrite = Musl.write
#elseif canImport(Darwin)
import Darwin
private let systemWrite = Darwin.write
#endif

/// Where access-log lines go: standard output by default (the service's own
/// logs go to standard error); tests pass their own.
///
/// The server calls ``write`` from one dedicated thread, never from a request
/// (see ``AccessLogQueue``): it may block.
public struct AccessLogSink: Sendable {
    /// Lines that may wait for the sink: at about 250 bytes a line, 2 MB.
    public static let defaultCapacity = 8_192

    /// Takes one whole line, newline included.
    public let write: @Sendable (ByteBuffer) -> Void
    /// Lines that may wait for ``write``; past them, lines are dropped and counted.
    public let capacity: Int

    public init(capacity: Int = defaultCapacity, _ write: @escaping @Sendable (ByteBuffer) -> Void) {
        precondition(capacity > 0, "an access log needs room for a line")
        self.capacity = capacity
        self.write = write
    }

    /// Writes each line to file descriptor 1 whole, with a `write(2)` loop.
    public static let standardOutput = AccessLogSink { line in
        line.withUnsafeReadableBytes { bytes in
            var offset = 0
            while offset < bytes.count {
                let written = systemWrite(1, bytes.baseAddress! + offset, bytes.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    return  // stdout is gone: drop the line, never fail the request
                }
                offset += written
            }
        }
    }
}

extension RequestRecord {
    /// One JSON line:
    /// `{"time":"2026-11-29T09:30:00.123Z","request_id":"...","method":"POST","path":"/jobs","status":200,"pool":"jobs","worker":3,"queue_us":12,"run_us":3,"total_us":40,"bytes_in":29,"bytes_out":70}`,
    /// with `"backend"` after `worker` for a proxied request; `worker`,
    /// `queue_us` and `run_us` are null when no worker ran the request.
    func accessLogLine(at time: WallClockTime) -> ByteBuffer {
        var out = ByteBuffer()
        out.reserveCapacity(256 + uri.utf8.count)
        out.writeStaticString("{\"time\":\"")
        time.writeRFC3339(into: &out)
        out.writeStaticString("\",\"request_id\":")
        out.writeJSONString(requestID)
        out.writeStaticString(",\"method\":")
        out.writeJSONString(method.rawValue)
        out.writeStaticString(",\"path\":")
        out.writeJSONString(uri)
        out.writeStaticString(",\"status\":")
        out.writeString(String(status.code))
        out.writeStaticString(",\"pool\":")
        out.writeJSONString(pool.rawValue)
        out.writeStaticString(",\"worker\":")
        if let served {
            out.writeString(String(served.worker))
            if let backend = served.backend {
                out.writeStaticString(",\"backend\":")
                out.writeJSONString(backend)
            }
            out.writeStaticString(",\"queue_us\":")
            out.writeString(String(served.queued.microseconds))
            out.writeStaticString(",\"run_us\":")
            out.writeString(String(served.ran.microseconds))
        } else {
            out.writeStaticString("null,\"queue_us\":null,\"run_us\":null")
        }
        out.writeStaticString(",\"total_us\":")
        out.writeString(String(total.microseconds))
        out.writeStaticString(",\"bytes_in\":")
        out.writeString(String(bytesIn))
        out.writeStaticString(",\"bytes_out\":")
        out.writeString(String(bytesOut))
        out.writeStaticString("}\n")
        return out
    }
}

/// The time of day in UTC, to the millisecond.
struct WallClockTime {
    var seconds: Int
    var milliseconds: Int

    static var now: WallClockTime {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return WallClockTime(seconds: Int(spec.tv_sec), milliseconds: Int(spec.tv_nsec) / 1_000_000)
    }

    /// `2026-11-29T09:30:00.123Z`.
    func writeRFC3339(into out: inout ByteBuffer) {
        var time = time_t(seconds)
        var parts = tm()
        gmtime_r(&time, &parts)
        func two(_ value: Int32) { out.writeInteger(UInt8(48 + value / 10)); out.writeInteger(UInt8(48 + value % 10)) }
        out.writeString(String(parts.tm_year + 1900))
        out.writeInteger(UInt8(ascii: "-"))
        two(parts.tm_mon + 1)
        out.writeInteger(UInt8(ascii: "-"))
        two(parts.tm_mday)
        out.writeInteger(UInt8(ascii: "T"))
        two(parts.tm_hour)
        out.writeInteger(UInt8(ascii: ":"))
        two(parts.tm_min)
        out.writeInteger(UInt8(ascii: ":"))
        two(parts.tm_sec)
        out.writeInteger(UInt8(ascii: "."))
        out.writeInteger(UInt8(48 + milliseconds / 100))
        two(Int32(milliseconds % 100))
        out.writeStaticString("Z")
    }
}

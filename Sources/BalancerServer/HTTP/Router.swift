import BalancerCore
import Logging
import NIOCore
import NIOHTTP1

/// An answer ready to write: status, JSON or text body, extra headers.
struct Response: Sendable {
    var status: HTTPResponseStatus
    var body: ByteBuffer
    var contentType: String = "application/json"
    var headers: [(String, String)] = []
    /// The pool that answered, for the metrics and the access log.
    var pool = PoolName.server
    /// The worker that ran the job, when one did.
    var served: Served?

    init(status: HTTPResponseStatus = .ok, body: ByteBuffer, contentType: String = "application/json", headers: [(String, String)] = []) {
        self.status = status
        self.body = body
        self.contentType = contentType
        self.headers = headers
    }

    init(_ error: APIError, allocator: ByteBufferAllocator) {
        self.init(status: error.status, body: error.body(allocator: allocator), headers: error.headers)
    }
}

/// The server's own answers: `POST /jobs`, `GET /stats`, `GET /dashboard`,
/// `GET /metrics`, `GET /healthz`, `GET /readyz`, the admin API
/// (`/admin/...`). ``Routes`` decides first which requests come here.
///
/// Every failure becomes an ``APIError`` (mapped to its status in one place);
/// nothing here throws to the connection.
struct Router: Sendable {
    let balancer: Balancer
    let registry: JobRegistry
    let limits: JobLimits
    let state: ServerState
    let upstreams: [UpstreamPool]
    /// Latency histograms and `/metrics`; `nil` when `metrics` is off.
    let metrics: ServerMetrics?
    /// `nil` when `access_log` is off.
    let accessLog: AccessLogQueue?
    let allocator = ByteBufferAllocator()

    /// Answers a request ``Routes`` sent here (`target` is `.admin`, `.jobs`
    /// or `.notFound`).
    func respond(to head: HTTPRequestHead, body: ByteBuffer?, target: Routes.Target) async -> Response {
        let uri = head.uri
        let path: Substring
        let query: Substring
        if let mark = uri.utf8.firstIndex(of: UInt8(ascii: "?")) {
            path = uri[..<mark]
            query = uri[uri.index(after: mark)...]
        } else {
            path = uri[...]
            query = ""
        }
        if case .notFound = target { return Response(.notFound(path), allocator: allocator) }
        switch path {
        case "/jobs":
            guard head.method == .POST else { return Response(.methodNotAllowed(head.method, path, allow: "POST"), allocator: allocator) }
            var response = await job(body: body)
            response.pool = .jobs
            return response
        case "/stats":
            guard head.method == .GET else { return Response(.methodNotAllowed(head.method, path, allow: "GET"), allocator: allocator) }
            return await stats(query: query)
        case "/metrics":
            guard let metrics else { return Response(.notFound(path), allocator: allocator) }
            guard head.method == .GET else { return Response(.methodNotAllowed(head.method, path, allow: "GET"), allocator: allocator) }
            return Response(body: await renderMetrics(metrics), contentType: ServerMetrics.contentType)
        case "/healthz":
            guard head.method == .GET else { return Response(.methodNotAllowed(head.method, path, allow: "GET"), allocator: allocator) }
            return Response(body: ByteBuffer(string: "{\"status\":\"ok\"}\n"))
        case "/dashboard":
            guard head.method == .GET else { return Response(.methodNotAllowed(head.method, path, allow: "GET"), allocator: allocator) }
            return Response(body: Dashboard.body, contentType: "text/html; charset=utf-8")
        case "/readyz":
            guard head.method == .GET else { return Response(.methodNotAllowed(head.method, path, allow: "GET"), allocator: allocator) }
            if state.isDraining {
                return Response(.notReady, allocator: allocator)
            }
            return Response(body: ByteBuffer(string: "{\"status\":\"ready\"}\n"))
        default:
            if path.hasPrefix("/admin/") { return await admin(head, path: path, body: body) }
            return Response(.notFound(path), allocator: allocator)
        }
    }

    // MARK: - POST /jobs

    private func job(body: ByteBuffer?) async -> Response {
        do {
            let decoded = try registry.decode(try JSONParser.parse(body ?? ByteBuffer()), limits: limits)
            let receipt: Receipt<JSONValue>
            if let timeout = decoded.timeout {
                receipt = try await submit(decoded, timeout: timeout)
            } else {
                receipt = try await submit(decoded)
            }
            var out = allocator.buffer(capacity: 96)
            out.writeStaticString("{\"op\":")
            out.writeJSONString(decoded.op)
            out.writeStaticString(",\"result\":")
            out.writeJSON(receipt.value)
            out.writeStaticString(",\"worker\":")
            out.writeString(String(receipt.worker))
            out.writeStaticString(",\"queued_us\":")
            out.writeString(String(receipt.queued.microseconds))
            out.writeStaticString(",\"run_us\":")
            out.writeString(String(receipt.ran.microseconds))
            if decoded.replicas != nil {
                out.writeStaticString(",\"replicas\":")
                out.writeString(String(receipt.copies))
            }
            out.writeStaticString("}\n")
            var response = Response(body: out)
            response.served = Served(worker: receipt.worker, queued: receipt.queued, ran: receipt.ran)
            return response
        } catch {
            return Response(APIError(error), allocator: allocator)
        }
    }

    /// Races the job against its `timeout_ms`; on timeout the submit is
    /// cancelled (a queued job never runs, a running one sees cancellation)
    /// and the answer is 504.
    private func submit(_ decoded: DecodedJob, timeout: Duration) async throws -> Receipt<JSONValue> {
        try await withThrowingTaskGroup(of: Receipt<JSONValue>?.self) { group in
            group.addTask { try await submit(decoded) }
            group.addTask {
                try await Task.sleep(for: timeout)
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let receipt = first else {
                if Task.isCancelled { throw BalancerError.cancelled }
                throw APIError.jobTimeout
            }
            return receipt
        }
    }

    /// Runs the job on the least-loaded worker, or as `replicas` copies.
    private func submit(_ decoded: DecodedJob) async throws -> Receipt<JSONValue> {
        let job = decoded.job
        guard let replicas = decoded.replicas else {
            return try await balancer.submitWithReceipt { try await job.run() }
        }
        return try await balancer.submitReplicated(replicas: replicas) { _ in try await job.run() }
    }

    // MARK: - GET /stats

    private func stats(query: Substring) async -> Response {
        var format = "json"
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            if parts.first == "format" { format = parts.count > 1 ? String(parts[1]) : "" }
        }
        let snapshot = await balancer.stats()
        let uptime = state.uptime
        let latency = metrics?.jobs.latency.snapshot()
        switch format {
        case "json":
            var out = allocator.buffer(capacity: 256 + (latency == nil ? 128 : 512) * snapshot.workers.count)
            var json = StatsRendering.json(snapshot, uptime: uptime, latency: latency)
            if !upstreams.isEmpty, case .object(var object) = json {
                var pools: [JSONValue] = []
                for upstream in upstreams {
                    let upstreamLatency = metrics?.pool(upstream.poolName)?.latency.snapshot()
                    pools.append(await upstream.statsJSON(latency: upstreamLatency))
                }
                object.members.append((key: "pools", value: .array(pools)))
                json = .object(object)
            }
            if case .object(var object) = json {
                object.members.append(
                    (key: "connections", value: .object(JSONObject([("send_timeouts", JSONValue(state.connections.sendTimeoutCount))]))))
                json = .object(object)
            }
            if let accessLog, case .object(var object) = json {
                object.members.append(
                    (key: "access_log", value: .object(JSONObject([("queued", JSONValue(accessLog.queued)), ("dropped", JSONValue(accessLog.dropped))]))))
                json = .object(object)
            }
            out.writeJSON(json)
            out.writeStaticString("\n")
            return Response(body: out)
        case "text":
            return Response(
                body: ByteBuffer(string: StatsRendering.text(snapshot, uptime: uptime, latency: latency)),
                contentType: "text/plain; charset=utf-8"
            )
        default:
            return Response(.badRequest("query \"format\" must be json or text, not \"\(format)\""), allocator: allocator)
        }
    }

    // MARK: - GET /metrics

    private func renderMetrics(_ metrics: ServerMetrics) async -> ByteBuffer {
        let jobs = await balancer.stats()
        var pools: [ServerMetrics.UpstreamSnapshot] = []
        for upstream in upstreams {
            pools.append((upstream.poolName, await upstream.balancer.stats(), upstream.backendName(ofWorker:)))
        }
        return metrics.render(
            jobs: jobs, upstreams: pools, sendTimeouts: state.connections.sendTimeoutCount, accessLogDropped: accessLog?.dropped)
    }
}

extension Duration {
    /// Whole microseconds.
    var microseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000 + attoseconds / 1_000_000_000_000
    }

    /// Whole milliseconds.
    var milliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000 + attoseconds / 1_000_000_000_000_000
    }
}

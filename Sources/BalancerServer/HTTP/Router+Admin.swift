import NIOCore
import NIOHTTP1

/// The runtime admin API, like HAProxy's runtime API: backends of the upstream
/// pools changed without a restart.
///
/// | request | effect |
/// | --- | --- |
/// | `GET /admin/backends` | every backend of every pool, with its state |
/// | `GET /admin/backends/{name}` | one backend |
/// | `POST /admin/backends` `{"pool":..,"name":..,"url":..,"connections":K}` | adds a backend with K workers (201) |
/// | `POST /admin/backends/{name}/drain` | no new requests; running ones finish |
/// | `POST /admin/backends/{name}/ready` | back in rotation (when healthy) |
/// | `DELETE /admin/backends/{name}` | out of rotation now, gone when its running requests end (202) |
///
/// It has no authentication of its own: bind it with `admin_port` to a port
/// only operators can reach (the listener shares `host`; firewall it), as
/// HAProxy's stats socket is kept private.
extension Router {
    func admin(_ head: HTTPRequestHead, path: Substring, body: ByteBuffer?) async -> Response {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst(2)  // "", "admin"
        guard parts.first == "backends" else { return Response(.notFound(path), allocator: allocator) }
        do {
            switch (parts.count, head.method) {
            case (1, .GET):
                var items: [JSONValue] = []
                for upstream in upstreams { items += await upstream.backendsJSON() }
                return json(.object(["backends": .array(items)]))
            case (1, .POST):
                return try await addBackend(body: body)
            case (1, _):
                return Response(.methodNotAllowed(head.method, path, allow: "GET, POST"), allocator: allocator)
            case (2, .GET):
                let name = String(parts[parts.startIndex + 1])
                return json(try await backendJSON(name, in: try pool(of: name)))
            case (2, .DELETE):
                let name = String(parts[parts.startIndex + 1])
                let upstream = try pool(of: name)
                try upstream.remove(name)
                // Not read back: an idle backend may be gone already.
                return json(.object(["pool": .string(upstream.name), "name": .string(name), "state": .string("removing")]), status: .accepted)
            case (2, _):
                return Response(.methodNotAllowed(head.method, path, allow: "GET, DELETE"), allocator: allocator)
            case (3, .POST) where ["drain", "ready"].contains(parts.last):
                let name = String(parts[parts.startIndex + 1])
                let upstream = try pool(of: name)
                if parts.last == "drain" {
                    try await upstream.drain(name)
                } else {
                    try await upstream.ready(name)
                }
                return json(try await backendJSON(name, in: upstream))
            case (3, _) where ["drain", "ready"].contains(parts.last):
                return Response(.methodNotAllowed(head.method, path, allow: "POST"), allocator: allocator)
            default:
                return Response(.notFound(path), allocator: allocator)
            }
        } catch {
            return Response(APIError(error), allocator: allocator)
        }
    }

    /// `POST /admin/backends`: `pool` may be left out when there is one upstream pool.
    private func addBackend(body: ByteBuffer?) async throws -> Response {
        let request = try JSONParser.parse(body ?? ByteBuffer())
        let backend = try BackendConfiguration(json: request, path: "body", extraKeys: ["pool"])
        let upstream: UpstreamPool
        if case .object(let object) = request, let pool = object["pool"] {
            let name = try pool.configString("body.pool")
            guard let found = upstreams.first(where: { $0.name == name }) else { throw UpstreamPool.ChangeError.unknownPool(name) }
            upstream = found
        } else if upstreams.count == 1 {
            upstream = upstreams[0]
        } else {
            throw ConfigurationError("body: \"pool\" is missing; pools: \(upstreams.map(\.name).joined(separator: ", "))")
        }
        try await upstream.add(backend)
        return json(try await backendJSON(backend.name, in: upstream), status: .created)
    }

    private func pool(of backend: String) throws -> UpstreamPool {
        guard let upstream = upstreams.first(where: { $0.hasBackend(backend) }) else {
            throw UpstreamPool.ChangeError.unknownBackend(backend)
        }
        return upstream
    }

    private func backendJSON(_ name: String, in upstream: UpstreamPool) async throws -> JSONValue {
        let all = await upstream.backendsJSON()
        guard let found = all.first(where: { item in
            if case .object(let object) = item, object["name"] == .string(name) { return true }
            return false
        }) else { throw UpstreamPool.ChangeError.unknownBackend(name) }
        return found
    }

    private func json(_ value: JSONValue, status: HTTPResponseStatus = .ok) -> Response {
        var out = allocator.buffer(capacity: 256)
        out.writeJSON(value)
        out.writeStaticString("\n")
        return Response(status: status, body: out)
    }
}

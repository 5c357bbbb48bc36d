/// Where each request goes: the one place that decides between the admin
/// paths, the jobs pool and the upstream pools.
///
/// - Admin paths (``adminPaths`` and everything under `/admin/`) are answered
///   by the server itself: on the admin listener when `admin_port` is set (the
///   main port then sends them to the pools like any path), else on the main port.
/// - Otherwise the pool whose route is the longest prefix of the path takes it
///   (a plain string prefix, as nginx's prefix locations: `/api` also matches
///   `/apix`; write `/api/` to mean the directory). The jobs pool's route is `/jobs`.
/// - A path no route matches goes to the upstream pool without a route, if
///   there is one, else it is 404.
struct Routes: Sendable {
    /// What answers a request.
    enum Target: Sendable {
        /// The server's own paths, answered by ``Router``.
        case admin
        /// `POST /jobs` on the jobs balancer, answered by ``Router``.
        case jobs
        case upstream(UpstreamPool)
        case notFound
    }

    /// Which listener a connection came in on.
    enum Listener: Sendable {
        case main
        case admin
    }

    /// The server's own paths besides `/admin/...`.
    static let adminPaths: Set<Substring> = ["/stats", "/healthz", "/readyz", "/metrics", "/dashboard"]

    /// Whether admin paths are served on the main listener (no `admin_port`).
    let adminOnMain: Bool
    /// Routed pools, longest route first.
    private let prefixes: [(route: String, target: Target)]
    /// The upstream pool with no route.
    private let fallback: UpstreamPool?

    init(pools: [PoolConfiguration], upstreams: [UpstreamPool], adminOnMain: Bool) {
        self.adminOnMain = adminOnMain
        var prefixes: [(route: String, target: Target)] = []
        var fallback: UpstreamPool?
        for pool in pools {
            switch pool.kind {
            case .jobs:
                prefixes.append((PoolConfiguration.jobsRoute, .jobs))
            case .upstream:
                guard let upstream = upstreams.first(where: { $0.name == pool.name }) else { continue }
                if let route = pool.route {
                    prefixes.append((route, .upstream(upstream)))
                } else {
                    fallback = upstream
                }
            }
        }
        self.prefixes = prefixes.sorted { $0.route.utf8.count > $1.route.utf8.count }
        self.fallback = fallback
    }

    static func isAdminPath(_ path: Substring) -> Bool {
        adminPaths.contains(path) || path == "/admin" || path.hasPrefix("/admin/")
    }

    /// The target for a request for `uri` (path and query) that came in on `listener`.
    func target(for uri: String, on listener: Listener) -> Target {
        let path = uri.utf8.firstIndex(of: UInt8(ascii: "?")).map { uri[..<$0] } ?? uri[...]
        let admin = Self.isAdminPath(path)
        switch listener {
        case .admin:
            return admin ? .admin : .notFound
        case .main:
            if admin && adminOnMain { return .admin }
            for entry in prefixes where path.hasPrefix(entry.route) {
                return entry.target
            }
            return fallback.map { .upstream($0) } ?? .notFound
        }
    }
}

import Foundation
import Testing

@Suite("GET /dashboard")
struct DashboardTests {
    @Test("a self-contained HTML page that polls /stats, with hooks for tests")
    func page() async throws {
        try await withServer { server in
            let page = try await request(server.url("/dashboard"))
            #expect(page.status == 200)
            #expect(page.header("Content-Type") == "text/html; charset=utf-8")
            #expect(page.text.hasPrefix("<!doctype html>"))
            #expect(page.text.contains(#"fetch("stats""#))
            #expect(page.text.contains("window.lastStats = stats"))
            #expect(page.text.contains("bar.dataset.workerId") && page.text.contains("bar.dataset.pending"))
            // Nothing from elsewhere: no external scripts, styles, fonts or images.
            for outside in ["http://", "https://", "<script src", "<link", "@import", "url("] {
                #expect(!page.text.contains(outside), "\(outside)")
            }
            let post = try await request(server.url("/dashboard"), method: "POST", body: "{}")
            #expect(post.status == 405 && post.header("Allow") == "GET")
        }
    }

    @Test("with an upstream pool the server answers /dashboard itself")
    func notProxied() async throws {
        let backend = try await UpstreamTestBackend.start()
        try await withServer({ $0.upstreams = ["http://127.0.0.1:\(backend.port)"] }) { server in
            let page = try await request(server.url("/dashboard"))
            #expect(page.status == 200 && page.text.contains("window.lastStats"))
            #expect(page.header("x-connection-id") == nil)
            #expect(backend.connectionsAccepted == 0)
        }
        await backend.stop()
    }
}

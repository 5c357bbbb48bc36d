import NIOCore

/// `GET /dashboard`: one self-contained HTML page (no external scripts, styles
/// or fonts) that polls `/stats` every 500 ms and draws it.
///
/// It shows each worker's pending as a bar scaled to the capacity (the talk's
/// picture of the load evening out), throughput (completed per second, from
/// successive snapshots) and p99 over the last five minutes as inline SVG
/// charts, the backlog and the errors, and each upstream pool (`pools`) when
/// there are any.
///
/// Hooks for tests: every bar is `.bar[data-pool][data-worker-id][data-pending]`
/// (`data-pool` is `jobs`, or an upstream pool's name),
/// and `window.lastStats` holds the snapshot the page last rendered
/// (`window.renderCount` counts renders).
enum Dashboard {
    /// The page, encoded once.
    static let body = ByteBuffer(string: html)

    static let html: String = #"""
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>swift-balancer</title>
        <style>
          :root { --bg: #10141a; --panel: #181e27; --line: #2a3340; --text: #d8dee9; --dim: #8591a3;
                  --fill: #4fb0ff; --full: #ff7a59; --ok: #7bd88f; --bad: #ff6b6b; }
          * { box-sizing: border-box; }
          body { margin: 0; padding: 16px 20px; background: var(--bg); color: var(--text);
                 font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
          h1 { font-size: 18px; margin: 0 0 4px; }
          h2 { font-size: 13px; font-weight: 600; color: var(--dim); text-transform: uppercase;
               letter-spacing: .06em; margin: 0 0 8px; }
          .meta { color: var(--dim); margin-bottom: 14px; }
          .meta b { color: var(--text); font-weight: 600; }
          #status.down { color: var(--bad); }
          .panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
                   padding: 12px 14px; margin-bottom: 14px; }
          .bars { display: flex; align-items: flex-end; gap: 6px; height: 190px; overflow-x: auto; }
          .bar { flex: 1 0 26px; max-width: 64px; display: flex; flex-direction: column; align-items: center;
                 height: 100%; }
          .bar .track { flex: 1; width: 100%; background: #0c1016; border: 1px solid var(--line);
                        border-radius: 4px; display: flex; align-items: flex-end; overflow: hidden; }
          .bar .fill { width: 100%; background: var(--fill); transition: height .3s ease; }
          .bar.full .fill { background: var(--full); }
          .bar.down .track { opacity: .35; }
          .bar .value { font-variant-numeric: tabular-nums; font-weight: 600; margin-top: 3px; }
          .bar .label { color: var(--dim); font-size: 11px; white-space: nowrap; overflow: hidden;
                        text-overflow: ellipsis; max-width: 100%; }
          .tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); gap: 10px; }
          .tile { background: #0c1016; border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
          .tile .k { color: var(--dim); font-size: 12px; }
          .tile .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
          .tile.bad .v { color: var(--bad); }
          .charts { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
          @media (max-width: 800px) { .charts { grid-template-columns: 1fr; } }
          svg { width: 100%; height: 120px; display: block; }
          svg .axis { stroke: var(--line); }
          svg text { fill: var(--dim); font-size: 10px; }
          svg polyline { fill: none; stroke-width: 1.8; }
          .hidden { display: none; }
        </style>
        </head>
        <body>
        <h1>swift-balancer</h1>
        <div class="meta">
          <span id="status">connecting…</span> · strategy <b id="strategy">-</b> · capacity <b id="capacity">-</b>
          · uptime <b id="uptime">-</b> · pending mean <b id="mean">-</b> variance <b id="variance">-</b>
        </div>
        <div class="panel">
          <h2>Pending per worker (scaled to capacity)</h2>
          <div class="bars" id="workers"></div>
        </div>
        <div class="panel">
          <div class="tiles">
            <div class="tile"><div class="k">throughput</div><div class="v" id="throughput">-</div></div>
            <div class="tile"><div class="k">p99 total</div><div class="v" id="p99">-</div></div>
            <div class="tile"><div class="k">in flight</div><div class="v" id="inflight">-</div></div>
            <div class="tile"><div class="k">backlog</div><div class="v" id="backlog">-</div></div>
            <div class="tile" id="overloaded-tile"><div class="k">overloaded</div><div class="v" id="overloaded">-</div></div>
            <div class="tile" id="timedout-tile"><div class="k">queue timeouts</div><div class="v" id="timedout">-</div></div>
            <div class="tile" id="failed-tile"><div class="k">failed</div><div class="v" id="failed">-</div></div>
            <div class="tile"><div class="k">completed</div><div class="v" id="completed">-</div></div>
          </div>
        </div>
        <div class="charts">
          <div class="panel"><h2>Throughput, completed/s (up to 5 min)</h2><svg id="throughput-chart"></svg></div>
          <div class="panel"><h2>p99 total latency (up to 5 min)</h2><svg id="p99-chart"></svg></div>
        </div>
        <div id="pools"></div>
        <script>
        "use strict";
        const HISTORY_MS = 5 * 60 * 1000;
        const POLL_MS = 500;
        const history = { throughput: [], p99: [] };
        let previous = null;
        window.lastStats = null;
        window.renderCount = 0;

        const $ = (id) => document.getElementById(id);
        const number = (n) => (n === undefined || n === null) ? "-" : Number(n).toLocaleString("en-US");
        function duration(us) {
          if (us === undefined || us === null) return "n/a";
          if (us < 1000) return us + " µs";
          if (us < 1e6) return (us / 1000).toFixed(1) + " ms";
          return (us / 1e6).toFixed(2) + " s";
        }

        function renderBars(container, pool, workers, capacity, label) {
          const existing = new Map([...container.children].map((el) => [el.dataset.workerId, el]));
          const keep = new Set();
          for (const w of workers) {
            const id = String(w.id);
            keep.add(id);
            let bar = existing.get(id);
            if (!bar) {
              bar = document.createElement("div");
              bar.className = "bar";
              bar.innerHTML = '<div class="track"><div class="fill"></div></div><div class="value"></div><div class="label"></div>';
              container.appendChild(bar);
            }
            const pending = w.pending || 0;
            const fraction = Math.min(1, pending / Math.max(1, capacity));
            bar.dataset.pool = pool;
            bar.dataset.workerId = id;
            bar.dataset.pending = String(pending);
            bar.dataset.capacity = String(capacity);
            bar.classList.toggle("full", pending >= capacity);
            bar.classList.toggle("down", w.state !== "active");
            bar.title = label(w) + ": " + pending + " pending of " + capacity + ", " + w.state;
            bar.querySelector(".fill").style.height = (fraction * 100).toFixed(1) + "%";
            bar.querySelector(".value").textContent = pending;
            bar.querySelector(".label").textContent = label(w);
          }
          for (const [id, el] of existing) if (!keep.has(id)) el.remove();
        }

        // The time axis grows with the data, from 30 s up to HISTORY_MS.
        function chart(svg, points, color, format, empty) {
          const width = svg.clientWidth || 400, height = svg.clientHeight || 120, left = 62, bottom = 14;
          const now = Date.now();
          const span = points.length ? Math.min(HISTORY_MS, Math.max(30000, now - points[0].t)) : HISTORY_MS;
          const max = Math.max(1, ...points.map((p) => p.v)) * 1.1;
          const x = (t) => left + (width - left) * (1 - (now - t) / span);
          const y = (v) => (height - bottom) * (1 - v / max) + 2;
          const line = points.map((p) => x(p.t).toFixed(1) + "," + y(p.v).toFixed(1)).join(" ");
          const ago = span >= 60000 ? Math.round(span / 60000) + " min" : Math.round(span / 1000) + " s";
          svg.setAttribute("viewBox", "0 0 " + width + " " + height);
          svg.innerHTML =
            '<line class="axis" x1="' + left + '" y1="' + (height - bottom + 2) + '" x2="' + width + '" y2="' + (height - bottom + 2) + '"/>' +
            '<line class="axis" x1="' + left + '" y1="2" x2="' + left + '" y2="' + (height - bottom + 2) + '"/>' +
            '<text x="' + left + '" y="' + height + '">-' + ago + '</text>' +
            '<text x="' + width + '" y="' + height + '" text-anchor="end">now</text>' +
            (points.length
              ? '<text x="' + (left - 4) + '" y="10" text-anchor="end">' + format(max) + '</text>' +
                '<text x="' + (left - 4) + '" y="' + (height - bottom + 2) + '" text-anchor="end">0</text>' +
                '<polyline stroke="' + color + '" points="' + line + '"/>' +
                '<circle r="2.5" fill="' + color + '" cx="' + x(points[points.length - 1].t).toFixed(1) +
                '" cy="' + y(points[points.length - 1].v).toFixed(1) + '"/>'
              : '<text x="' + ((width + left) / 2) + '" y="' + (height / 2) + '" text-anchor="middle">' + empty + '</text>');
        }

        function remember(series, t, v) {
          series.push({ t, v });
          while (series.length && series[0].t < t - HISTORY_MS) series.shift();
        }

        // One panel per upstream pool (`pools` in /stats): its connections as bars
        // (each holds one request at a time), its backlog and its errors.
        function renderPools(pools) {
          const container = $("pools");
          const existing = new Map([...container.children].map((el) => [el.dataset.pool, el]));
          const keep = new Set();
          for (const pool of pools) {
            keep.add(pool.name);
            let panel = existing.get(pool.name);
            if (!panel) {
              panel = document.createElement("div");
              panel.className = "panel";
              panel.dataset.pool = pool.name;
              panel.innerHTML = '<h2></h2><div class="meta"></div><div class="bars"></div>';
              container.appendChild(panel);
            }
            const queue = pool.queue || {};
            let errors = 0;
            for (const w of pool.workers || []) for (const k in (w.errors || {})) errors += w.errors[k];
            panel.querySelector("h2").textContent = "Pool " + pool.name +
              (typeof pool.route === "string" ? " (" + pool.route + ")" : "") + ": pending per upstream connection";
            panel.querySelector(".meta").textContent =
              "strategy " + (pool.strategy || "-") + " · backlog " + number(queue.depth) + " / " + number(queue.limit) +
              " · overloaded " + number(queue.overloaded) + " · timed out " + number(queue.timed_out) +
              " · unavailable " + number(queue.unavailable) + " · errors " + number(errors);
            renderBars(panel.querySelector(".bars"), pool.name, pool.workers || [], 1, (w) => w.backend + " #" + w.id);
          }
          for (const [name, el] of existing) if (!keep.has(name)) el.remove();
        }

        function render(stats) {
          const now = Date.now();
          const totals = stats.totals || {}, queue = stats.queue || {};
          const capacity = stats.capacity || 1;
          $("status").textContent = stats.shutting_down ? "draining" : "live";
          $("status").className = stats.shutting_down ? "down" : "";
          $("strategy").textContent = stats.strategy || "-";
          $("capacity").textContent = capacity;
          $("uptime").textContent = stats.uptime_s !== undefined ? stats.uptime_s.toFixed(1) + " s" : "-";
          $("mean").textContent = (stats.pending_mean || 0).toFixed(2);
          $("variance").textContent = (stats.pending_variance || 0).toFixed(2);
          renderBars($("workers"), "jobs", stats.workers || [], capacity, (w) => "w" + w.id);

          const done = (totals.completed || 0) + (totals.failed || 0);
          if (previous && stats.uptime_s > previous.uptime) {
            const rate = Math.max(0, done - previous.done) / (stats.uptime_s - previous.uptime);
            $("throughput").textContent = number(Math.round(rate)) + "/s";
            remember(history.throughput, now, rate);
          }
          previous = { done, uptime: stats.uptime_s };
          const total = stats.latency_us && stats.latency_us.total;
          $("p99").textContent = total ? duration(total.p99) : "n/a";
          if (total) remember(history.p99, now, total.p99);
          $("inflight").textContent = number(totals.in_flight);
          $("backlog").textContent = number(queue.depth) + " / " + number(queue.limit);
          $("overloaded").textContent = number(queue.overloaded);
          $("timedout").textContent = number(queue.timed_out);
          $("failed").textContent = number(totals.failed);
          $("completed").textContent = number(totals.completed);
          $("overloaded-tile").classList.toggle("bad", queue.overloaded > 0);
          $("timedout-tile").classList.toggle("bad", queue.timed_out > 0);
          $("failed-tile").classList.toggle("bad", totals.failed > 0);
          chart($("throughput-chart"), history.throughput, "#4fb0ff", (v) => number(Math.round(v)), "waiting for a second snapshot");
          chart($("p99-chart"), history.p99, "#ffb454", duration,
                total ? "waiting for data" : "this server does not report latencies in /stats");

          renderPools(stats.pools || []);
          window.lastStats = stats;
          window.renderCount += 1;
        }

        async function poll() {
          try {
            const response = await fetch("stats", { cache: "no-store" });
            if (!response.ok) throw new Error("HTTP " + response.status);
            render(await response.json());
          } catch (error) {
            $("status").textContent = "no answer from /stats: " + error.message;
            $("status").className = "down";
          }
          setTimeout(poll, POLL_MS);
        }
        poll();
        </script>
        </body>
        </html>

        """#
}

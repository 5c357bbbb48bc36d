"""GET /metrics, read by the official Prometheus client's parser."""

import threading

from conftest import eventually
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def scrape(server):
    status, headers, body = server.get("/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    return {family.name: family for family in text_string_to_metric_families(body)}


def samples(family, name=None, **labels):
    """The samples of `family` (named `name`, default the family's) whose labels include `labels`."""
    return [
        sample
        for sample in family.samples
        if (name is None or sample.name == name) and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def value(family, name=None, **labels):
    found = samples(family, name, **labels)
    assert len(found) == 1, f"{family.name} {name} {labels}: {found}"
    return found[0].value


def test_metrics_match_stats(balancer_factory):
    # 2 workers with room for one job each, a backlog of one that waits 1 s at most.
    server = balancer_factory("--workers", "2", "--capacity", "1", "--backlog", "1", "--queue-timeout-ms", "1000")

    for i in range(12):
        status, answer = server.job({"op": "multiply", "x": i, "y": 3})
        assert status == 200 and answer["result"] == 3 * i
    assert server.job({"op": "nope"})[0] == 400
    assert server.request("POST", "/jobs", "{not json")[0] == 400

    # Fill both workers with 4 s sleeps; a third job waits in the backlog and
    # times out; a fourth, while the backlog is full, is refused at once.
    answers = {}

    def post(name, job):
        answers[name] = server.job(job)

    sleepers = [threading.Thread(target=post, args=(f"sleep{i}", {"op": "sleep", "ms": 4000})) for i in range(2)]
    for thread in sleepers:
        thread.start()
    assert eventually(lambda: server.stats()["totals"]["in_flight"] == 2)
    waiter = threading.Thread(target=post, args=("waiter", {"op": "multiply", "x": 1, "y": 1}))
    waiter.start()
    assert eventually(lambda: server.stats()["queue"]["depth"] == 1)
    status, refused = server.job({"op": "multiply", "x": 2, "y": 2})
    assert status == 503 and refused["error"] == "overloaded"
    waiter.join()
    assert answers["waiter"][0] == 503 and answers["waiter"][1]["error"] == "queue_timeout"

    # A quiet moment: only the two sleeps are in flight, one on each worker.
    families = scrape(server)
    stats = server.stats()
    assert stats["totals"]["in_flight"] == 2

    pending = families["balancer_worker_pending"]
    assert pending.type == "gauge"
    jobs_pending = samples(pending, pool="jobs")
    assert sorted(s.labels["worker"] for s in jobs_pending) == ["0", "1"]
    assert all(set(s.labels) == {"pool", "worker"} for s in jobs_pending)
    assert sum(s.value for s in jobs_pending) == stats["totals"]["in_flight"]
    for worker in stats["workers"]:
        assert value(pending, pool="jobs", worker=str(worker["id"])) == worker["pending"]

    assert families["balancer_in_flight"].type == "gauge"
    assert value(families["balancer_in_flight"], pool="jobs") == 2
    assert families["balancer_backlog_depth"].type == "gauge"
    assert value(families["balancer_backlog_depth"], pool="jobs") == stats["queue"]["depth"] == 0

    overloaded = families["balancer_overloaded"]
    assert overloaded.type == "counter"
    assert value(overloaded, "balancer_overloaded_total", pool="jobs") == stats["queue"]["overloaded"] == 1
    timeouts = families["balancer_queue_timeouts"]
    assert timeouts.type == "counter"
    assert value(timeouts, "balancer_queue_timeouts_total", pool="jobs") == stats["queue"]["timed_out"] == 1
    send_timeouts = families["balancer_send_timeouts"]
    assert send_timeouts.type == "counter"
    assert value(send_timeouts, "balancer_send_timeouts_total") == stats["connections"]["send_timeouts"] == 0

    requests = families["balancer_requests"]
    assert requests.type == "counter"
    assert value(requests, "balancer_requests_total", pool="jobs", **{"class": "2xx"}) == stats["totals"]["completed"] == 12
    assert value(requests, "balancer_requests_total", pool="jobs", **{"class": "4xx"}) == 2
    assert value(requests, "balancer_requests_total", pool="jobs", **{"class": "5xx"}) == 2
    assert value(requests, "balancer_requests_total", pool="jobs", **{"class": "3xx"}) == 0

    for name in ("balancer_queue_wait_seconds", "balancer_run_seconds", "balancer_request_duration_seconds"):
        histogram = families[name]
        assert histogram.type == "histogram"
        assert value(histogram, name + "_count", pool="jobs") == stats["totals"]["completed"]
        buckets = samples(histogram, name + "_bucket", pool="jobs")
        bounds = [float(s.labels["le"]) for s in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        counts = [s.value for s in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        assert counts[-1] == stats["totals"]["completed"]
    # The same jobs, in /stats's own histograms.
    assert stats["latency_us"]["total"]["count"] == stats["totals"]["completed"]

    for thread in sleepers:
        thread.join()
    assert [answers[f"sleep{i}"][0] for i in range(2)] == [200, 200]
    families = scrape(server)
    stats = server.stats()
    assert sum(s.value for s in samples(families["balancer_worker_pending"], pool="jobs")) == 0
    assert value(families["balancer_run_seconds"], "balancer_run_seconds_count", pool="jobs") == 14
    # Scraping again does not count the overloaded job twice.
    assert value(families["balancer_overloaded"], "balancer_overloaded_total", pool="jobs") == 1
    assert stats["latency_us"]["run"]["p50"] <= stats["latency_us"]["run"]["max"]
    assert stats["latency_us"]["run"]["max"] >= 4_000_000


def test_metrics_off(balancer_factory):
    server = balancer_factory("--no-metrics")
    status, headers, body = server.get("/metrics")
    assert status == 404
    assert '"not_found"' in body
    assert "latency_us" not in server.get("/stats")[2]

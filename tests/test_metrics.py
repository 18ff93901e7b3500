"""``GET /metrics`` of a real ``qkit serve``: the ledger's figures in the Prometheus text format.

This process writes known jobs through ``qkit.connect`` on the server's
``QKIT_HOME``; each scrape is parsed with ``prometheus_client``'s own parser
and its samples compared with what was written (and with the ledger's rows).
"""
from __future__ import annotations

import secrets
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import qkit
from qkit.dev.servers import wait_until
from api_support import home, running  # noqa: F401 (home: a fixture)

ADMIN = "adm-" + secrets.token_hex(16)
READER = "rdr-" + secrets.token_hex(16)
METRICS = "met-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(home):
    yield from running(home, "metrics", QKIT_API_TOKEN=ADMIN, QKIT_API_READ_TOKEN=READER,
                       QKIT_METRICS_TOKEN=METRICS)


@pytest.fixture(scope="module")
def written(home):
    """Queue mx-a: 2 web_scraping completed (one slept 300 ms), 1 ai_text_generation failed after 2 attempts,
    1 web_scraping due, 1 delayed an hour.  Queue mx-b: one job due, paused."""
    q = qkit.connect("mx-a", home=str(home), backoff_base=0)
    q.enqueue("web_scraping", {})
    q.enqueue("web_scraping", {"simulate": {"latency_ms": 300}})
    dead = q.enqueue("ai_text_generation", {"simulate": {"fail_rate": 1.0}}, max_attempts=2)
    summary = q.work(max_jobs=10)
    assert (summary.completed, summary.failed, q.get(dead).status) == (2, 1, "failed")
    started = time.time()
    q.enqueue("web_scraping", {"i": "due"})
    q.enqueue("web_scraping", {"i": "later"}, delay=3600)
    b = qkit.connect("mx-b", home=str(home))
    b.enqueue("ai_image_generation", {})
    b.pause()
    yield q, started
    q.close()
    b.close()


def scrape(server, token: str = METRICS) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items -> value} of one scrape (histogram series by their sample names)."""
    reply = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def labels(**kw: str) -> tuple:
    return tuple(sorted(kw.items()))


def test_counts_attempts_and_queue_gauges(server, written):
    q, started = written
    # due on the server's estimate of Redis's clock, which may trail this process's by a few ms
    wait_until(lambda: scrape(server)["qkit_queue_depth"][labels(queue="mx-a")] == 1, 30, "mx-a's job is due")
    m = scrape(server)
    jobs = m["qkit_jobs"]
    assert jobs[labels(queue="mx-a", type="web_scraping", status="completed")] == 2
    assert jobs[labels(queue="mx-a", type="web_scraping", status="pending")] == 2
    assert jobs[labels(queue="mx-a", type="ai_text_generation", status="failed")] == 1
    assert jobs[labels(queue="mx-b", type="ai_image_generation", status="pending")] == 1
    assert sum(v for k, v in jobs.items() if dict(k)["queue"] == "mx-a") == 5

    attempts = m["qkit_attempts_total"]
    assert attempts[labels(queue="mx-a", type="ai_text_generation", outcome="failed")] == 2
    assert attempts[labels(queue="mx-a", type="web_scraping", outcome="completed")] == 2

    assert m["qkit_queue_depth"][labels(queue="mx-a")] == 1
    assert m["qkit_queue_delayed"][labels(queue="mx-a")] == 1
    assert m["qkit_queue_depth"][labels(queue="mx-b")] == 1
    assert m["qkit_dlq_size"][labels(queue="mx-a")] == 1
    assert m["qkit_dlq_size"][labels(queue="mx-b")] == 0
    assert m["qkit_queue_paused"][labels(queue="mx-a")] == 0
    assert m["qkit_queue_paused"][labels(queue="mx-b")] == 1
    age = m["qkit_queue_oldest_due_age_seconds"][labels(queue="mx-a")]
    assert 0 <= age <= time.time() - started + 2
    # read at scrape time: a later scrape sees the job wait longer, and a burst's work at once
    wait_until(lambda: scrape(server)["qkit_queue_oldest_due_age_seconds"][labels(queue="mx-a")] >= age + 0.5, 30,
               "the oldest due job's age grows")
    q.work(max_jobs=10)
    after = scrape(server)
    assert after["qkit_queue_depth"][labels(queue="mx-a")] == 0
    assert after["qkit_queue_oldest_due_age_seconds"][labels(queue="mx-a")] == 0
    assert after["qkit_attempts_total"][labels(queue="mx-a", type="web_scraping", outcome="completed")] == 3


def test_execution_time_histogram_matches_the_attempts(server, written):
    q, _ = written
    m = scrape(server)
    series = labels(queue="mx-a", type="web_scraping")
    buckets = {dict(k)["le"]: v for k, v in m["qkit_job_execution_seconds_bucket"].items()
               if dict(k)["queue"] == "mx-a" and dict(k)["type"] == "web_scraping"}
    durations = [a["duration_ms"] / 1000 for j in q.jobs(type="web_scraping", status="completed")
                 for a in q.ledger.attempts(j.id)]
    assert m["qkit_job_execution_seconds_count"][series] == len(durations) == buckets["+Inf"]
    assert m["qkit_job_execution_seconds_sum"][series] == pytest.approx(sum(durations), rel=1e-6, abs=1e-6)
    bounds = sorted((float(le), n) for le, n in buckets.items() if le != "+Inf")
    assert [n for _, n in bounds] == sorted(n for _, n in bounds)  # cumulative
    for bound, n in bounds:
        assert n == sum(1 for d in durations if d <= bound), bound
    assert buckets["0.25"] < buckets["+Inf"]  # the job that slept 300 ms is above 0.25 s
    failed = labels(queue="mx-a", type="ai_text_generation")
    assert m["qkit_job_execution_seconds_count"][failed] == 2  # failed attempts are timed too


def test_who_may_scrape(server, written):
    for token in (METRICS, ADMIN, READER):
        assert httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = httpx.get(f"{server.url}/metrics", headers=headers)
        assert reply.status_code == 401 and reply.json() == {"error": "missing or invalid credentials"}
    # the metrics token opens /metrics only
    for method, path in (("GET", "/api/jobs"), ("GET", "/api/queues"), ("POST", "/api/jobs")):
        reply = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {METRICS}"},
                              json={"type": "x", "payload": {}})
        assert reply.status_code == 403 and "/metrics only" in reply.json()["error"], (method, path)
    assert httpx.get(f"{server.url}/metrics?x=1", headers={"Authorization": f"Bearer {METRICS}"}).status_code == 422


# --------------------------------------------------------------------------- the same reads on PostgreSQL
def test_overview_and_scrape_on_each_ledger(setup):
    """The overview's and the collector's SQL on SQLite and PostgreSQL (a shared database: other tests'
    queues are there too, so only this test's queue is compared)."""
    if setup.name == "upstash-sqlite":
        pytest.skip("the same SQLite ledger as embedded-sqlite")
    from qkit.api.metrics import scrape as scrape_ledger
    from qkit.api.routes_ops import queue_rows

    q = setup.connect(backoff_base=0)
    q.enqueue("web_scraping", {})
    q.enqueue("ai_text_generation", {"simulate": {"fail_rate": 1.0}}, max_attempts=1)
    q.work(max_jobs=10)
    q.enqueue("web_scraping", {})
    q.enqueue("web_scraping", {}, delay=3600)
    assert q.name in q.ledger.queue_names()

    def row() -> dict:
        (mine,) = [r for r in queue_rows(q.ledger, "default") if r["queue"] == q.name]
        return mine

    wait_until(lambda: row()["depth"] == 1, 30, "the job is due")
    row = row()
    assert (row["counts"]["pending"], row["counts"]["completed"], row["counts"]["failed"]) == (2, 1, 1)
    assert (row["depth"], row["delayed"], row["paused"]) == (1, 1, False) and row["oldest_due_age_s"] >= 0

    mine = {}
    for family in text_string_to_metric_families(scrape_ledger(q.ledger, "default").decode()):
        for sample in family.samples:
            if sample.labels.get("queue") == q.name:
                mine[(sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "queue")))] = \
                    sample.value
    assert mine[("qkit_jobs", labels(type="web_scraping", status="pending"))] == 2
    assert mine[("qkit_attempts_total", labels(type="ai_text_generation", outcome="failed"))] == 1
    assert mine[("qkit_job_execution_seconds_count", labels(type="web_scraping"))] == 1
    assert mine[("qkit_job_execution_seconds_bucket", labels(type="web_scraping", le="+Inf"))] == 1
    assert (mine[("qkit_queue_depth", ())], mine[("qkit_dlq_size", ())]) == (1, 1)

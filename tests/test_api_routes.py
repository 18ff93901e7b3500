"""The operator's routes of ``qkit serve`` (``/api/queues``, ``/api/stats``, ``/api/runs``, cancel) and the
roles (admin, reader), against a real server process on loopback.

One ``python -m qkit.cli serve`` on a fresh ``QKIT_HOME`` with an admin token
and a read token; this process writes the jobs it then asks about through
``qkit.connect`` on the same home (the same embedded Redis and SQLite ledger).
"""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

import qkit
from qkit.model import STATUSES
from api_support import fuzz_test, home, running, schema_of  # noqa: F401 (home: a fixture)
from qkit.dev.servers import wait_until
from services import ApiServer, serve_home

ADMIN = "adm-" + secrets.token_hex(16)
READER = "rdr-" + secrets.token_hex(16)
WORKER = "wrk-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(home):
    yield from running(home, "routes", QKIT_API_TOKEN=ADMIN, QKIT_API_READ_TOKEN=READER, WORKER_SECRET=WORKER)


def client(server: ApiServer, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


@pytest.fixture(scope="module")
def admin(server):
    with client(server, ADMIN) as c:
        yield c


@pytest.fixture(scope="module")
def reader(server):
    with client(server, READER) as c:
        yield c


@pytest.fixture()
def connect(home):
    opened = []

    def open_queue(name: str, **extra) -> qkit.Queue:
        opened.append(qkit.connect(name, home=str(home), backoff_base=0, **extra))
        return opened[-1]

    yield open_queue
    for q in opened:
        q.close()


def one_line_error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) <= {"error", "field"} and "\n" not in body["error"]
    return body["error"]


# --------------------------------------------------------------------------- roles
def test_reader_reads_everything_and_writes_nothing(admin, reader, server):
    job_id = admin.post("/api/jobs", json={"type": "roles.probe", "payload": {"n": 1}, "delay": 3600}).json()["id"]
    assert reader.get(f"/api/jobs/{job_id}").json()["payload"] == {"n": 1}
    assert [j["id"] for j in reader.get("/api/jobs", params={"type": "roles.probe"}).json()["jobs"]] == [job_id]
    for path in ("/api/queues", "/api/stats", "/api/runs"):
        assert reader.get(path).status_code == 200, path

    refused = reader.post("/api/jobs", json={"type": "roles.probe", "payload": {"n": 2}})
    assert "can only read" in one_line_error(refused, 403)
    assert [j["id"] for j in admin.get("/api/jobs", params={"type": "roles.probe"}).json()["jobs"]] == [job_id]
    # the read token is no worker secret either
    assert httpx.post(f"{server.url}/api/workers", headers={"Authorization": f"Bearer {READER}"}).status_code == 401


def test_wrong_tokens_are_401_on_every_new_route(server):
    for path in ("/api/queues", "/api/stats", "/api/runs", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {ADMIN}x"}):
            reply = httpx.get(server.url + path, headers=headers)
            assert one_line_error(reply, 401) == "missing or invalid credentials", (path, headers)


def test_a_server_without_tokens_closes_the_new_routes(home):
    srv = serve_home(home, home.parent / "closed-routes.log", QKIT_API_TOKEN=" ")
    try:
        for method, path in (("GET", "/api/queues"), ("GET", "/api/stats"), ("GET", "/api/runs"),
                             ("GET", "/metrics"), ("POST", "/api/jobs/1/cancel"), ("GET", "/api/jobs")):
            reply = httpx.request(method, srv.url + path, headers={"Authorization": f"Bearer {ADMIN}"})
            assert "is not set on the server" in one_line_error(reply, 503), path
    finally:
        srv.stop()


# --------------------------------------------------------------------------- /api/queues, /api/stats
def test_queues_lists_every_queue_with_counts_depth_and_age(admin, connect):
    q = connect("rt-queues")
    dead = q.enqueue("ai_text_generation", {"simulate": {"fail_rate": 1.0}}, max_attempts=1)
    assert q.work(max_jobs=10).failed == 1 and q.get(dead).status == "failed"
    t0 = time.time()
    q.enqueue("web_scraping", {"i": 1})
    q.enqueue("web_scraping", {"i": 2})
    q.enqueue("web_scraping", {"i": 3}, delay=3600)

    def rows() -> dict:
        return {r["queue"]: r for r in admin.get("/api/queues").json()["queues"]}

    # due on the server's estimate of Redis's clock, which may trail this process's by a few ms
    wait_until(lambda: rows()["rt-queues"]["depth"] == 2, 30, "the new jobs are due on the server's clock")
    first = rows()
    assert "default" in first  # the served queue is listed even when empty
    row = first["rt-queues"]
    assert row["counts"] == {**{s: 0 for s in STATUSES}, "pending": 3, "failed": 1}
    assert (row["total"], row["depth"], row["delayed"], row["paused"]) == (4, 2, 1, False)
    assert 0 <= row["oldest_due_age_s"] <= time.time() - t0 + 2
    # the oldest due job keeps waiting
    wait_until(lambda: rows()["rt-queues"]["oldest_due_age_s"] >= row["oldest_due_age_s"] + 0.5, 30,
               "the oldest due job's age grows")

    q.work(max_jobs=10)
    drained = rows()["rt-queues"]
    assert (drained["depth"], drained["oldest_due_age_s"], drained["counts"]["completed"]) == (0, None, 2)


def test_queues_shows_a_paused_queue(admin, connect):
    q = connect("rt-paused")
    q.enqueue("web_scraping", {})

    def paused() -> bool:
        return {r["queue"]: r for r in admin.get("/api/queues").json()["queues"]}["rt-paused"]["paused"]

    assert paused() is False
    q.pause()
    assert paused() is True
    q.resume()
    assert paused() is False


def test_stats_of_any_queue(admin, connect):
    q = connect("rt-stats")
    q.enqueue("web_scraping", {})
    q.enqueue("ai_text_generation", {"simulate": {"fail_rate": 1.0}}, max_attempts=1)
    q.work(max_jobs=10)
    stats = admin.get("/api/stats", params={"queue": "rt-stats"}).json()
    assert (stats["queue"], stats["total"], stats["completed"], stats["failed"], stats["success_rate"]) == \
        ("rt-stats", 2, 1, 1, 0.5)
    assert admin.get("/api/stats").json()["queue"] == "default"
    assert "no queue 'rt-nothing'" in one_line_error(admin.get("/api/stats", params={"queue": "rt-nothing"}), 404)
    assert admin.get("/api/stats", params={"queue": "Bad Name"}).json()["field"] == "queue"
    assert admin.get("/api/stats", params={"queue": "rt-stats", "x": "1"}).json()["field"] == "x"
    assert admin.get("/api/stats?queue=a&queue=b").status_code == 422


# --------------------------------------------------------------------------- cancel
def test_cancel_pending_delayed_and_finished_jobs(admin, reader, connect):
    due = admin.post("/api/jobs", json={"type": "cancel.probe", "payload": {}}).json()["id"]
    later = admin.post("/api/jobs", json={"type": "cancel.probe", "payload": {}, "delay": 3600}).json()["id"]
    refused = reader.post(f"/api/jobs/{due}/cancel")
    assert "can only read" in one_line_error(refused, 403)
    assert admin.get(f"/api/jobs/{due}").json()["status"] == "pending"  # the reader changed nothing
    for job_id in (due, later):
        reply = admin.post(f"/api/jobs/{job_id}/cancel")
        assert reply.status_code == 200 and reply.json() == {"id": job_id, "status": "cancelled"}
        assert admin.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"
    assert "is cancelled" in one_line_error(admin.post(f"/api/jobs/{due}/cancel"), 409)
    q = connect("default")
    assert q.work(max_jobs=10).processed == 0  # neither runs
    done = admin.post("/api/jobs", json={"type": "web_scraping", "payload": {}}).json()["id"]
    q.work(max_jobs=10)
    assert "is completed" in one_line_error(admin.post(f"/api/jobs/{done}/cancel"), 409)
    for path in ("/api/jobs/999999999/cancel", "/api/jobs/abc/cancel"):
        one_line_error(admin.post(path), 404)


def test_cancel_of_a_running_job_asks_its_handler(admin, connect, home):
    """The handler sees cancel_requested (with the next lease renewal) and returns; the job ends cancelled."""
    q = connect("default", lease_seconds=3)
    job_id = admin.post("/api/jobs", json={"type": "cancel.wait", "payload": {}}).json()["id"]
    answers = []

    @qkit.handler("cancel.wait")
    def wait(payload):
        deadline = time.monotonic() + 60
        answers.append(admin.post(f"/api/jobs/{job_id}/cancel"))  # from inside: the job is processing
        while not qkit.current_job().cancel_requested and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"stopped": qkit.current_job().cancel_requested}

    q.work(max_jobs=1)
    assert answers[0].status_code == 200 and answers[0].json() == {"id": job_id, "status": "processing"}
    job = admin.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["result"] == {"stopped": True}


# --------------------------------------------------------------------------- /api/runs
def test_runs_page_newest_first(admin, connect):
    q = connect("rt-runs")
    run_ids = []
    for i in range(3):
        q.enqueue("web_scraping", {"i": i})
        run_ids.append(q.work(max_jobs=1, trigger="cli").run_id)
    seen, url = [], "/api/runs?queue=rt-runs&limit=2"
    while url:
        page = admin.get(url).json()
        assert len(page["runs"]) <= 2
        seen += page["runs"]
        url = page["next"]
    assert [r["id"] for r in seen] == sorted(run_ids, reverse=True)
    assert {(r["queue"], r["trigger"], r["status"], r["processed"]) for r in seen} == {("rt-runs", "cli", "ok", 1)}
    assert admin.get("/api/runs", params={"queue": "rt-runs", "limit": 0}).json()["field"] == "limit"
    assert admin.get("/api/runs", params={"queue": "rt-none"}).status_code == 404


# --------------------------------------------------------------------------- fuzzing with the read token
@pytest.fixture(scope="module")
def api_schema(server):
    return schema_of(server.url)


# every answer to a reader (403 for writes, 401 for the worker route) is one the document declares
test_openapi_fuzz_with_the_read_token = fuzz_test(lambda case: READER, max_examples=15)

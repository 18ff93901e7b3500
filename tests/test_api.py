"""The HTTP API (``qkit serve``) against real server processes on loopback.

Two ``python -m qkit.cli serve`` processes share one fresh ``QKIT_HOME`` (so
one embedded Redis, stopped at teardown): ``server`` has every secret set,
``closed_server`` has ``QKIT_API_TOKEN`` empty and ``WORKER_SECRET`` unset.
Both log to files that the last test scans for secrets.  Readiness is polled
on ``/api/health``; nothing waits on a fixed sleep.  No mocks: the unit tests
at the end call the pure auth helpers of ``qkit.api`` directly.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import create_engine, select

from qkit.api import MAX_BODY_BYTES, UNAVAILABLE, bearer_token, endpoint_url, token_matches, verify_qstash_signature
from qkit.backends.embedded import EmbeddedServer
from qkit.model import MAX_PAYLOAD_BYTES
from api_support import fuzz_test, schema_of
from services import ApiServer, start_api_server

ROOT = Path(__file__).resolve().parents[1]
# Random per run, so "no secret in the logs" cannot pass by accident.
API_TOKEN = "api-" + secrets.token_hex(16)
WORKER_SECRET = "wrk-" + secrets.token_hex(16)
QSTASH_CURRENT = "sig_cur_" + secrets.token_hex(16)
QSTASH_NEXT = "sig_next_" + secrets.token_hex(16)
SECRETS = (API_TOKEN, WORKER_SECRET, QSTASH_CURRENT, QSTASH_NEXT)
MAX_SECONDS_CAP, MAX_JOBS_CAP = 5, 200
SCRUBBED = ("QKIT_", "UPSTASH_", "QSTASH_", "WORKER_SECRET")


# --------------------------------------------------------------------------- servers
def start_server(home: Path, log_path: Path, env_extra: dict[str, str]) -> ApiServer:
    """``qkit serve`` on ``home`` with the test caps and ``env_extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    env.update(QKIT_HOME=str(home), QKIT_API_MAX_SECONDS=str(MAX_SECONDS_CAP),
               QKIT_API_MAX_JOBS=str(MAX_JOBS_CAP), **env_extra)
    return start_api_server(env, log_path)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-home")
    yield path
    EmbeddedServer(path).stop()  # after the servers (they depend on this fixture)


@pytest.fixture(scope="module")
def server(home):
    srv = start_server(home, home.parent / "server.log", {
        "QKIT_API_TOKEN": API_TOKEN, "WORKER_SECRET": WORKER_SECRET,
        "QSTASH_CURRENT_SIGNING_KEY": QSTASH_CURRENT, "QSTASH_NEXT_SIGNING_KEY": QSTASH_NEXT})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def closed_server(home):
    srv = start_server(home, home.parent / "closed.log", {"QKIT_API_TOKEN": ""})  # WORKER_SECRET unset
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs_api(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def workers_api(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {WORKER_SECRET}"}, timeout=60) as c:
        yield c


def enqueue(api: httpx.Client, type_: str = "web_scraping", payload: dict | None = None, **extra) -> int:
    reply = api.post("/api/jobs", json={"type": type_, "payload": payload or {}, **extra})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def ledger_runs(home: Path, run_id: int) -> dict:
    from qkit.ledger import worker_runs

    engine = create_engine(f"sqlite:///{home / 'ledger.sqlite3'}")
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(worker_runs).where(worker_runs.c.id == run_id)).mappings().one())
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- health, openapi
def test_health_answers_without_auth_and_reveals_nothing(server, closed_server):
    for srv in (server, closed_server):
        reply = httpx.get(f"{srv.url}/api/health")
        assert reply.status_code == 200
        assert reply.json() == {"status": "ok", "checks": {"redis": "ok", "ledger": "ok"}}
        assert "server" not in reply.headers  # no server software named
        text = reply.text.lower()
        assert not any(s in text for s in ("redis://", "sqlite", "unix", "qkit_", "version", "/tmp"))


def test_openapi_document(server):
    doc = httpx.get(f"{server.url}/api/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/api/jobs", "/api/jobs/{id}", "/api/workers", "/api/health"} <= set(doc["paths"])
    assert set(doc["paths"]["/api/jobs"]) == {"get", "post"}
    wrong = httpx.delete(f"{server.url}/api/jobs", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert wrong.status_code == 405 and {"GET", "POST"} <= set(wrong.headers["allow"].replace(" ", "").split(","))
    assert httpx.get(f"{server.url}/nothing/here").status_code == 404


# --------------------------------------------------------------------------- jobs routes
def test_enqueue_get_and_list(jobs_api):
    reply = jobs_api.post("/api/jobs", json={"type": "scheduled_publish", "payload": {"channel": "blog"},
                                             "priority": 7, "max_attempts": 2, "delay": 3600})
    assert reply.status_code == 201
    body = reply.json()
    assert set(body) == {"id", "status"} and body["status"] == "pending"
    assert reply.headers["location"] == f"/api/jobs/{body['id']}"

    job = jobs_api.get(f"/api/jobs/{body['id']}").json()
    assert (job["type"], job["payload"], job["priority"], job["max_attempts"], job["status"]) == \
        ("scheduled_publish", {"channel": "blog"}, 7, 2, "pending")
    assert job["attempts_detail"] == []

    listed = jobs_api.get("/api/jobs", params={"type": "scheduled_publish", "status": "pending"}).json()
    assert listed["jobs"][0]["id"] == body["id"]
    assert "payload" not in listed["jobs"][0]  # lists stay small; GET /api/jobs/{id} has it
    assert listed["next"] is None


def test_list_pages_newest_first_with_a_cursor(jobs_api):
    ids = [enqueue(jobs_api, "page.probe", {"i": i}, delay=3600) for i in range(5)]
    seen, url = [], "/api/jobs?type=page.probe&limit=2"
    while url:
        page = jobs_api.get(url).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        url = page["next"]
        assert (url is None) == (page["next_before_id"] is None)
    assert seen == sorted(ids, reverse=True)


def test_idempotency_key_returns_the_same_job(jobs_api):
    key = "k-" + uuid.uuid4().hex
    first = enqueue(jobs_api, "web_scraping", {"url": "a"}, key=key, delay=3600)
    again = jobs_api.post("/api/jobs", json={"type": "web_scraping", "payload": {"url": "b"}, "key": key})
    assert again.status_code == 200 and again.json() == {"id": first, "status": "pending", "duplicate": True}
    assert again.headers["location"] == f"/api/jobs/{first}"
    assert jobs_api.get(f"/api/jobs/{first}").json()["payload"] == {"url": "a"}  # the first job, unchanged


@pytest.mark.parametrize("path", ["/api/jobs/999999999", "/api/jobs/0", "/api/jobs/abc",
                                  "/api/jobs/99999999999999999999999", "/api/jobs/-1"])
def test_missing_job_is_404(jobs_api, path):
    reply = jobs_api.get(path)
    assert reply.status_code == 404 and "error" in reply.json()


# --------------------------------------------------------------------------- auth
BAD_AUTH = {
    "missing": {},
    "wrong": {"Authorization": "Bearer wrong-" + secrets.token_hex(8)},
    "non-ascii utf-8": {"Authorization": "Bearer t\u00f6ken-\u2603".encode("utf-8")},
    "non-ascii latin-1": {"Authorization": b"Bearer \xff\xfe" + API_TOKEN.encode()},
    "no scheme": {"Authorization": API_TOKEN},
    "basic scheme": {"Authorization": "Basic " + base64.b64encode(f"x:{API_TOKEN}".encode()).decode()},
    "scheme only": {"Authorization": "Bearer"},
    "token prefix": {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
    "token plus suffix": {"Authorization": f"Bearer {API_TOKEN}x"},
    "other route's secret": {"Authorization": f"Bearer {WORKER_SECRET}"},
}


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
def test_jobs_routes_refuse_bad_credentials(server, case):
    for method, path, body in (("GET", "/api/jobs", None), ("GET", "/api/jobs/1", None),
                               ("POST", "/api/jobs", {"type": "web_scraping", "payload": {}})):
        reply = httpx.request(method, server.url + path, headers=BAD_AUTH[case], json=body)
        assert reply.status_code == 401, (case, method, path)
        assert reply.json() == {"error": "missing or invalid credentials"}
        assert reply.headers["www-authenticate"].startswith("Bearer")


def test_two_authorization_headers_are_refused(server):
    headers = [("Authorization", f"Bearer {API_TOKEN}"), ("Authorization", f"Bearer {API_TOKEN}")]
    assert httpx.get(f"{server.url}/api/jobs", headers=headers).status_code == 401


def test_token_in_query_string_is_not_accepted(server):
    for name in ("token", "access_token", "api_token"):
        assert httpx.get(f"{server.url}/api/jobs", params={name: API_TOKEN}).status_code == 401


@pytest.mark.parametrize("value", [f"bearer {API_TOKEN}", f"BEARER {API_TOKEN}", f"Bearer    {API_TOKEN}",
                                   f"  Bearer {API_TOKEN}   ", f"Bearer\t{API_TOKEN}"])
def test_scheme_is_case_insensitive_and_spaces_around_the_token_are_ignored(server, value):
    # RFC 7235: the scheme is case-insensitive; RFC 6750: 1*SP before the token;
    # HTTP itself strips whitespace around a header value.  Sent on a raw socket:
    # httpx refuses to send a header value with surrounding spaces.
    assert raw_status(server.port, b"GET /api/jobs?limit=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                      b"Authorization:" + value.encode() + b"\r\n\r\n") == 200


def raw_status(port: int, request: bytes) -> int:
    """Send ``request`` bytes as they are; return the response's status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


def test_worker_route_refuses_bad_credentials(server):
    for headers in ({}, {"Authorization": f"Bearer {API_TOKEN}"}, {"Authorization": "Bearer nope"},
                    {"Authorization": "Bearer \u00e9t\u00e9".encode("utf-8")}):
        reply = httpx.post(f"{server.url}/api/workers", headers=headers, json={})
        assert reply.status_code == 401, headers


def test_unset_or_empty_tokens_close_their_routes(closed_server):
    url = closed_server.url
    for method, path, token in (("GET", "/api/jobs", ""), ("GET", "/api/jobs/1", "anything"),
                                ("POST", "/api/jobs", API_TOKEN), ("POST", "/api/workers", WORKER_SECRET),
                                ("POST", "/api/workers", "")):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        reply = httpx.request(method, url + path, headers=headers, json={"type": "web_scraping", "payload": {}}
                              if path == "/api/jobs" else {})
        assert reply.status_code == 503, (method, path)
        assert "is not set" in reply.json()["error"]


# --------------------------------------------------------------------------- body limits
def test_oversized_body_with_content_length_is_413(jobs_api, server):
    big = json.dumps({"type": "web_scraping", "payload": {"x": "a" * (MAX_BODY_BYTES + 10)}}).encode()
    reply = jobs_api.post("/api/jobs", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and "larger than" in reply.json()["error"]
    # Refused on the declared length alone: the server answers before any body byte is sent.
    assert raw_status(server.port, b"POST /api/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                      + API_TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 50000000\r\n\r\n") == 413


def test_oversized_chunked_body_is_413_and_not_read_to_the_end(jobs_api):
    total = 50 * 1024 * 1024
    sent = [0]

    def body():
        chunk = b"x" * 65536
        while sent[0] < total:
            sent[0] += len(chunk)
            yield chunk

    reply = jobs_api.post("/api/jobs", content=body(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert sent[0] < total  # the server stopped reading; the client stopped sending


def test_oversized_worker_body_is_413(workers_api):
    reply = workers_api.post("/api/workers", content=b'{"max_jobs": 1, "pad": "' + b"x" * 20000 + b'"}')
    assert reply.status_code == 413


def test_payload_limit_is_exact(jobs_api):
    # {"x":"aaa..."} is 8 bytes of envelope around the string
    fits = {"x": "a" * (MAX_PAYLOAD_BYTES - 8)}
    assert len(json.dumps(fits, separators=(",", ":"))) == MAX_PAYLOAD_BYTES
    type_ = "limit.probe"
    assert jobs_api.post("/api/jobs", json={"type": type_, "payload": fits, "delay": 3600}).status_code == 201
    over = {"x": "a" * (MAX_PAYLOAD_BYTES - 7)}
    reply = jobs_api.post("/api/jobs", json={"type": type_, "payload": over})
    assert reply.status_code == 413 and reply.json()["field"] == "payload"
    assert len(jobs_api.get("/api/jobs", params={"type": type_}).json()["jobs"]) == 1  # nothing written


# --------------------------------------------------------------------------- bad input
BAD_JOB_BODIES = [
    (b'{"type": "web_scraping", "payload": ', 400, None),
    (b"[1, 2]", 400, None),
    (b"", 400, None),
    (b'"just a string"', 400, None),
    (b'{"type": "web_scraping", "payload": {}, "priority": NaN}', 400, None),
    (b'{"type": "web_scraping", "payload": {"x": 1e999}}', 400, None),
    (b'{"type": "web_scraping", "payload": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (b'{"type": "web_scraping", "payload": ' + b'{"a":' * 70 + b"1" + b"}" * 70 + b"}", 400, None),
    (b"\xff\xfe\xfa", 400, None),
    (b'{"payload": {}}', 422, "type"),
    (b'{"type": "web_scraping"}', 422, "payload"),
    (b'{"type": "Not A Type!", "payload": {}}', 422, "type"),
    (b'{"type": 5, "payload": {}}', 422, "type"),
    (b'{"type": "web_scraping", "payload": [1]}', 422, "payload"),
    (b'{"type": "web_scraping", "payload": {}, "priority": "high"}', 422, "priority"),
    (b'{"type": "web_scraping", "payload": {}, "priority": 1.5}', 422, "priority"),
    (b'{"type": "web_scraping", "payload": {}, "priority": 10000000}', 422, "priority"),
    (b'{"type": "web_scraping", "payload": {}, "max_attempts": 0}', 422, "max_attempts"),
    (b'{"type": "web_scraping", "payload": {}, "max_attempts": true}', 422, "max_attempts"),
    (b'{"type": "web_scraping", "payload": {}, "delay": -1}', 422, "delay"),
    (b'{"type": "web_scraping", "payload": {}, "delay": 1' + b"0" * 400 + b"}", 422, "delay"),
    (b'{"type": "web_scraping", "payload": {}, "priority": -1' + b"0" * 400 + b"}", 422, "priority"),
    (b'{"type": "web_scraping", "payload": {}, "priority": 1' + b"0" * 5000 + b"}", 400, None),
    (b'{"type": "web_scraping", "payload": {}, "max_attempts": 3.0, "x": 1}', 422, "x"),
    (b'{"type": "web_scraping", "payload": {}, "delay": "soon"}', 422, "delay"),
    (b'{"type": "web_scraping", "payload": {}, "key": ""}', 422, "key"),
    (b'{"type": "web_scraping", "payload": {}, "key": 12}', 422, "key"),
    (b'{"type": "web_scraping", "payload": {}, "queue": "other"}', 422, "queue"),
]


@pytest.mark.parametrize("raw,status,field", BAD_JOB_BODIES, ids=[f"{i}-{f or s}" for i, (_, s, f)
                                                                  in enumerate(BAD_JOB_BODIES)])
def test_bad_job_bodies_are_refused_naming_the_field(jobs_api, raw, status, field):
    before = jobs_api.get("/api/jobs", params={"limit": 1}).json()["jobs"]
    reply = jobs_api.post("/api/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body.get("field") == field
    if field:
        assert field.replace("_", " ") in body["error"].replace("_", " ") or field in body["error"]
    assert jobs_api.get("/api/jobs", params={"limit": 1}).json()["jobs"] == before  # nothing written


@pytest.mark.parametrize("query,field", [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"),
                                         ("status=done", "status"), ("type=Bad!", "type"),
                                         ("before_id=x", "before_id"), ("before_id=0", "before_id"),
                                         ("limit=5&limit=6", "limit"), ("stauts=pending", "stauts")])
def test_bad_list_queries_are_422_naming_the_parameter(jobs_api, query, field):
    reply = jobs_api.get(f"/api/jobs?{query}")
    assert reply.status_code == 422 and reply.json()["field"] == field


@pytest.mark.parametrize("raw,status,field", [
    (b"{not json", 400, None), (b"[]", 400, None), (b'{"max_jobs": 0}', 422, "max_jobs"),
    (b'{"max_jobs": "many"}', 422, "max_jobs"), (b'{"max_seconds": -1}', 422, "max_seconds"),
    (b'{"max_seconds": "long"}', 422, "max_seconds"), (b'{"concurrency": 4}', 422, "concurrency"),
    (b'{"max_seconds": 1' + b"0" * 400 + b"}", 422, "max_seconds"), (b'{"max_jobs": 2.5}', 422, "max_jobs")])
def test_bad_worker_bodies_are_refused_naming_the_field(workers_api, raw, status, field):
    reply = workers_api.post("/api/workers", content=raw)
    assert reply.status_code == status and reply.json().get("field") == field


# --------------------------------------------------------------------------- bursts
def test_burst_runs_and_answers_200_even_when_jobs_fail(jobs_api, workers_api, home):
    ok = [enqueue(jobs_api, "web_scraping", {"url": f"https://example.org/{i}"}) for i in range(3)]
    bad = enqueue(jobs_api, "ai_text_generation", {"simulate": {"fail_rate": 1.0}}, max_attempts=1)
    reply = workers_api.post("/api/workers", json={"max_jobs": 100})
    assert reply.status_code == 200
    summary = reply.json()
    assert summary["completed"] >= 3 and summary["failed"] >= 1 and summary["processed"] >= 4
    assert [jobs_api.get(f"/api/jobs/{i}").json()["status"] for i in ok] == ["completed"] * 3
    failed = jobs_api.get(f"/api/jobs/{bad}").json()
    assert failed["status"] == "failed" and "simulated upstream error" in failed["error"]
    run = ledger_runs(home, summary["run_id"])
    assert run["trigger"] == "http" and run["params"]["via"] == "bearer"


def test_burst_budget_is_capped_by_the_server(workers_api):
    reply = workers_api.post("/api/workers", json={"max_jobs": 10**9, "max_seconds": 1e9})
    assert reply.status_code == 200
    assert (reply.json()["max_jobs"], reply.json()["max_seconds"]) == (MAX_JOBS_CAP, MAX_SECONDS_CAP)
    # a huge integer is clamped like any other; 3.0 is the integer 3
    assert workers_api.post("/api/workers", json={"max_jobs": 10**400}).json()["max_jobs"] == MAX_JOBS_CAP
    assert workers_api.post("/api/workers", content=b'{"max_jobs": 3.0}').json()["max_jobs"] == 3
    # no body at all: the server's caps are the budget
    empty = workers_api.post("/api/workers")
    assert empty.status_code == 200 and empty.json()["max_seconds"] == MAX_SECONDS_CAP


def test_concurrent_bursts_run_each_job_once(jobs_api, workers_api):
    ids = [enqueue(jobs_api, "ai_image_generation", {"simulate": {"latency_ms": 5}}) for _ in range(24)]
    replies: list[httpx.Response] = []

    def burst() -> None:
        replies.append(workers_api.post("/api/workers", json={"max_jobs": 50}))

    threads = [threading.Thread(target=burst) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in replies] == [200, 200, 200]
    for job_id in ids:
        job = jobs_api.get(f"/api/jobs/{job_id}").json()
        assert (job["status"], job["attempts"], len(job["attempts_detail"])) == ("completed", 1, 1)


# --------------------------------------------------------------------------- QStash
def qstash_signature(body: bytes, url: str, key: str, *, exp_in: int = 300, nbf_in: int = 0,
                     issuer: str = "Upstash") -> str:
    """What QStash sends in ``Upstash-Signature``."""
    now = int(time.time())
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    claims = {"iss": issuer, "sub": url, "exp": now + exp_in, "nbf": now + nbf_in, "iat": now,
              "jti": "jwt_" + uuid.uuid4().hex, "body": digest}
    return jwt.encode(claims, key, algorithm="HS256")


def test_qstash_signed_requests(server, jobs_api):
    url = f"{server.url}/api/workers"
    body = b'{"max_jobs": 5}'

    def post(signature: str | bytes, content: bytes = body) -> httpx.Response:
        return httpx.post(url, content=content, headers={"Upstash-Signature": signature,
                                                         "Content-Type": "application/json"}, timeout=60)

    accepted = post(qstash_signature(body, url, QSTASH_CURRENT))
    assert accepted.status_code == 200 and accepted.json()["max_jobs"] == 5
    assert post(qstash_signature(body, url, QSTASH_NEXT)).status_code == 200  # key rotation
    assert post(qstash_signature(b"", url, QSTASH_CURRENT), content=b"").status_code == 200

    refused = {
        "tampered body": post(qstash_signature(body, url, QSTASH_CURRENT), content=b'{"max_jobs": 50}'),
        "wrong key": post(qstash_signature(body, url, "sig_" + secrets.token_hex(16))),
        "other endpoint": post(qstash_signature(body, f"{server.url}/api/other", QSTASH_CURRENT)),
        "expired": post(qstash_signature(body, url, QSTASH_CURRENT, exp_in=-120, nbf_in=-400)),
        "not yet valid": post(qstash_signature(body, url, QSTASH_CURRENT, nbf_in=120)),
        "wrong issuer": post(qstash_signature(body, url, QSTASH_CURRENT, issuer="Mallory")),
        "garbage": post("not.a.jwt"),
        "non-ascii": post("\u00e9.\u00e9.\u00e9".encode("utf-8")),
        "alg none": post(jwt.encode({"iss": "Upstash", "sub": url, "exp": int(time.time()) + 60,
                                     "nbf": 0, "body": "x"}, None, algorithm="none")),
    }
    assert {k: r.status_code for k, r in refused.items()} == {k: 401 for k in refused}


# --------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def api_schema(server):
    return schema_of(server.url)


# every documented route, with the secret it takes
test_openapi_fuzz_finds_no_server_error = fuzz_test(
    lambda case: WORKER_SECRET if case.path == "/api/workers" else API_TOKEN, max_examples=30)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(["type", "payload", "priority", "max_attempts", "delay", "key",
                                             "extra"]), json_values, max_size=6))
def test_fuzzed_job_bodies_never_cause_a_server_error(jobs_api, body):
    reply = jobs_api.post("/api/jobs", json=body)
    assert reply.status_code in (201, 400, 413, 422), reply.text


# --------------------------------------------------------------------------- backend faults
def test_backend_down_is_a_one_line_503_and_the_next_request_recovers(server, closed_server, workers_api, home):
    EmbeddedServer(home).stop()  # both servers still hold a client of the Redis that just died
    burst = workers_api.post("/api/workers", json={"max_jobs": 1})
    assert burst.status_code == 503 and burst.json() == {"error": UNAVAILABLE}  # no URL, no detail
    health = httpx.get(f"{closed_server.url}/api/health", timeout=60)
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "checks": {"redis": "unavailable", "ledger": "ok"}}
    # each server dropped its broken queue: the next request opens a new one, starting the embedded Redis
    assert httpx.get(f"{server.url}/api/health", timeout=60).status_code == 200
    assert httpx.get(f"{closed_server.url}/api/health", timeout=60).status_code == 200
    assert workers_api.post("/api/workers", json={"max_jobs": 1}).status_code == 200


# --------------------------------------------------------------------------- logs (keep last)
def test_logs_and_state_hold_no_secret(server, closed_server, jobs_api, workers_api, home):
    marker = "marker-" + secrets.token_hex(8)
    httpx.get(f"{server.url}/api/jobs", params={"token": API_TOKEN, "m": marker})  # 401; query never logged
    httpx.get(f"{server.url}/api/jobs/{marker}", headers={"Authorization": f"Bearer {API_TOKEN}"})
    httpx.post(f"{server.url}/api/workers", headers={"Authorization": f"Bearer {API_TOKEN}"})
    enqueue(jobs_api, "no_such_handler", {})
    assert workers_api.post("/api/workers", json={"max_jobs": 10}).status_code == 200
    server.stop()
    closed_server.stop()
    logs = server.log_path.read_text(errors="replace") + closed_server.log_path.read_text(errors="replace")
    assert "POST /api/workers 200" in logs and "GET /api/jobs/{id} 404" in logs  # the log is real
    assert marker not in logs
    for secret in SECRETS:
        assert secret not in logs
        for path in home.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- unit tests (no server)
def test_bearer_token_parsing():
    def scope(*values: bytes) -> dict:
        return {"headers": [(b"authorization", v) for v in values]}

    assert bearer_token(scope(b"Bearer abc")) == b"abc"
    assert bearer_token(scope(b"bEaReR   abc  ")) == b"abc"
    assert bearer_token(scope(b"Bearer a b")) == b"a b"  # then simply a mismatch
    for bad in (b"", b"Bearer", b"Bearer ", b"Basic abc", b"abc", b"Bearerabc"):
        assert bearer_token(scope(bad)) is None, bad
    assert bearer_token(scope(b"Bearer a", b"Bearer a")) is None
    assert bearer_token({"headers": []}) is None


def test_blank_secrets_count_as_unset(monkeypatch):
    from qkit.api import _secret

    for value in ("", "   ", "\t\n"):
        monkeypatch.setenv("QKIT_API_TOKEN", value)
        assert _secret("QKIT_API_TOKEN") is None
    monkeypatch.setenv("QKIT_API_TOKEN", "  tok  ")
    assert _secret("QKIT_API_TOKEN") == b"tok"
    monkeypatch.delenv("QKIT_API_TOKEN")
    assert _secret("QKIT_API_TOKEN") is None


def test_token_matches_is_bytes_safe():
    assert token_matches(b"s3cret", b"s3cret")
    assert not token_matches(b"s3cre", b"s3cret")
    assert not token_matches("s\u00e9cret".encode(), b"secret")
    assert not token_matches(None, b"secret")


def test_qstash_verification_unit(monkeypatch):
    url = "https://q.example.test/api/workers"
    keys = [QSTASH_CURRENT, QSTASH_NEXT]
    body = b'{"max_jobs": 1}'
    assert verify_qstash_signature(qstash_signature(body, url, QSTASH_NEXT), body, url, keys)
    assert verify_qstash_signature(qstash_signature(body, url + "/", QSTASH_CURRENT), body, url, keys)
    assert not verify_qstash_signature(qstash_signature(body, url, QSTASH_CURRENT), body + b" ", url, keys)
    assert not verify_qstash_signature(qstash_signature(body, url, QSTASH_CURRENT), body, url, [QSTASH_NEXT])
    # within the clock tolerance (10 s) an nbf slightly in the future is accepted
    assert verify_qstash_signature(qstash_signature(body, url, QSTASH_CURRENT, nbf_in=5), body, url, keys)

    from starlette.requests import Request

    request = Request({"type": "http", "method": "POST", "scheme": "http", "path": "/api/workers",
                       "query_string": b"", "headers": [(b"host", b"127.0.0.1:9")], "server": ("127.0.0.1", 9)})
    monkeypatch.delenv("QKIT_API_PUBLIC_URL", raising=False)
    assert endpoint_url(request) == "http://127.0.0.1:9/api/workers"
    monkeypatch.setenv("QKIT_API_PUBLIC_URL", "https://q.example.test/")
    assert endpoint_url(request) == url

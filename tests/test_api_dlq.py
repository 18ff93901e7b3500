"""The DLQ routes of ``qkit serve`` (``GET /api/dlq``, ``POST /api/dlq/replay``, ``POST /api/dlq/purge``)
against a real server process on loopback, with the admin and read tokens.

This process writes and works the jobs through ``qkit.connect`` on the server's home (the same embedded
Redis and SQLite ledger), with the handlers of ``tests/dlq_handlers.py``; the server only reads and admins.
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import qkit
from qkit.ops.audit import audit
from api_support import fuzz_test, home, running, schema_of  # noqa: F401 (home: a fixture)
# the admin and reader clients (fixtures) and their tokens, served here by this module's own server
from test_api_routes import ADMIN, READER, admin, one_line_error, reader  # noqa: F401


@pytest.fixture(scope="module")
def server(home):
    yield from running(home, "dlq-api", QKIT_API_TOKEN=ADMIN, QKIT_API_READ_TOKEN=READER)


_names = iter(range(1, 1000))


@pytest.fixture
def dead(home: Path):
    """A fresh queue whose DLQ holds 4 dlq_order jobs (one error, messages differing in ids) and 2 dlq_parse."""
    import dlq_handlers  # noqa: F401 - registers the handlers this process's bursts run

    q = qkit.connect(f"apidlq-{next(_names)}", home=str(home))
    ids = {"order": q.enqueue_many([{"type": "dlq_order", "payload": {"n": n}, "max_attempts": 1} for n in range(4)]),
           "parse": q.enqueue_many([{"type": "dlq_parse", "payload": {"n": n}, "max_attempts": 1} for n in range(2)])}
    q.work()
    assert len(q.dead()) == 6
    yield q, ids
    q.close()


def groups_of(c: httpx.Client, queue: str) -> dict[str, dict]:
    reply = c.get("/api/dlq", params={"queue": queue, "group": "1"})
    assert reply.status_code == 200, reply.text
    return {g["type"]: g for g in reply.json()["groups"]}


# --------------------------------------------------------------------------- GET /api/dlq
def test_list_jobs_and_groups_for_admins_and_readers(admin, reader, dead):
    q, ids = dead
    for c in (admin, reader):
        body = c.get("/api/dlq", params={"queue": q.name}).json()
        assert body["queue"] == q.name and {j["id"] for j in body["jobs"]} == set(ids["order"] + ids["parse"])
        assert all("payload" not in j and "result" not in j and j["fingerprint_id"] for j in body["jobs"])
    groups = groups_of(reader, q.name)
    assert (groups["dlq_order"]["jobs"], groups["dlq_parse"]["jobs"]) == (4, 2)
    assert sorted(groups["dlq_order"]["job_ids"]) == ids["order"] and "sample_payload" not in groups["dlq_order"]
    assert groups["dlq_order"]["fingerprint"].startswith("ValueError at dlq_handlers.py:dlq_order > charge: raise")
    assert len(admin.get("/api/dlq", params={"queue": q.name, "limit": 2}).json()["jobs"]) == 2


@pytest.mark.parametrize("params,status,field", [
    ({"group": "yes"}, 422, "group"), ({"limit": "0"}, 422, "limit"), ({"queue": "Bad!"}, 422, "queue"),
    ({"colour": "red"}, 422, "colour"), ({"queue": "apidlq-nosuch"}, 404, None),
])
def test_bad_list_queries_are_one_line(admin, params, status, field):
    reply = admin.get("/api/dlq", params=params)
    one_line_error(reply, status)
    assert reply.json().get("field") == field


# --------------------------------------------------------------------------- POST /api/dlq/replay
def test_replay_by_ids_fingerprint_and_all(admin, dead):
    q, ids = dead
    reply = admin.post("/api/dlq/replay", json={"queue": q.name, "ids": ids["parse"][:1]})
    assert reply.status_code == 200 and reply.json() == {"replayed": ids["parse"][:1]}, reply.text
    assert q.get(ids["parse"][0]).status == "pending"
    fp = groups_of(admin, q.name)["dlq_order"]["fingerprint_id"]
    assert admin.post("/api/dlq/replay", json={"queue": q.name, "fingerprint": fp}).json() == {"replayed": ids["order"]}
    assert admin.post("/api/dlq/replay", json={"queue": q.name, "all": True}).json() == {"replayed": ids["parse"][1:]}
    assert q.dead() == [] and {q.get(i).status for i in ids["order"] + ids["parse"]} == {"pending"}
    assert audit(q).clean


def test_replay_refusals_change_nothing(admin, reader, dead):
    q, ids = dead
    pending = q.enqueue("dlq_order", {"n": 9}, delay=3600)
    cases = [
        (reader, {"queue": q.name, "all": True}, 403),
        (admin, {"queue": q.name}, 422),
        (admin, {"queue": q.name, "all": True, "ids": ids["order"]}, 422),
        (admin, {"queue": q.name, "all": False}, 422),
        (admin, {"queue": q.name, "ids": []}, 422),
        (admin, {"queue": q.name, "ids": ["1"]}, 422),
        (admin, {"queue": q.name, "ids": [True]}, 422),
        (admin, {"queue": q.name, "fingerprint": " "}, 422),
        (admin, {"queue": q.name, "ids": ids["order"], "extra": 1}, 422),
        (admin, {"queue": q.name, "ids": [ids["order"][0], pending]}, 409),  # not failed: none replayed
        (admin, {"queue": q.name, "ids": [2**62]}, 404),
        (admin, {"queue": q.name, "fingerprint": "0000000000"}, 404),
        (admin, {"queue": "apidlq-nosuch", "all": True}, 404),
    ]
    for c, body, status in cases:
        one_line_error(c.post("/api/dlq/replay", json=body), status)
    one_line_error(admin.post("/api/dlq/replay", content=b"[1]"), 400)
    assert len(q.dead()) == 6


# --------------------------------------------------------------------------- POST /api/dlq/purge
def test_purge_dry_run_then_by_fingerprint_then_all(admin, dead):
    q, ids = dead
    fp = groups_of(admin, q.name)["dlq_order"]["fingerprint_id"]
    dry = admin.post("/api/dlq/purge", json={"queue": q.name, "dry_run": True, "fingerprint": fp})
    assert dry.status_code == 200 and dry.json() == {"dry_run": True, "would_purge": 4}, dry.text
    assert admin.post("/api/dlq/purge", json={"queue": q.name, "dry_run": True, "all": True}).json() == \
        {"dry_run": True, "would_purge": 6}
    assert len(q.dead()) == 6
    assert admin.post("/api/dlq/purge", json={"queue": q.name, "fingerprint": fp}).json() == \
        {"dry_run": False, "purged": 4}
    assert {j.id for j in q.dead()} == set(ids["parse"])
    # filters combine: ids AND older than an hour matches nothing yet
    assert admin.post("/api/dlq/purge", json={"queue": q.name, "ids": ids["parse"], "older_than": "1h"}).json() == \
        {"dry_run": False, "purged": 0}
    assert admin.post("/api/dlq/purge", json={"queue": q.name, "ids": ids["parse"][:1], "older_than": 0}).json() == \
        {"dry_run": False, "purged": 1}
    assert admin.post("/api/dlq/purge", json={"queue": q.name, "all": True}).json() == {"dry_run": False, "purged": 1}
    assert q.dead() == [] and audit(q).clean


@pytest.mark.parametrize("body,status,field", [
    ({}, 422, None),  # neither filters nor all: refused, not "purge everything"
    ({"all": True, "fingerprint": "x"}, 422, None),
    ({"dry_run": "yes", "all": True}, 422, "dry_run"),
    ({"older_than": "soon"}, 422, "older_than"),
    ({"older_than": -5}, 422, "older_than"),
    ({"older_than": "0s"}, 422, "older_than"),
    ({"older_than": True}, 422, "older_than"),
    ({"ids": [0]}, 422, "ids"),
    ({"fingerprint": ""}, 422, "fingerprint"),
    ({"all": True, "queue": 7}, 422, "queue"),
])
def test_bad_purge_bodies_are_one_line_and_purge_nothing(admin, dead, body, status, field):
    q, _ = dead
    reply = admin.post("/api/dlq/purge", json={"queue": q.name, **body} if "queue" not in body else body)
    one_line_error(reply, status)
    assert reply.json().get("field") == field and len(q.dead()) == 6


def test_a_reader_cannot_purge(reader, dead):
    q, _ = dead
    assert "can only read" in one_line_error(reader.post("/api/dlq/purge", json={"queue": q.name, "all": True}), 403)
    assert len(q.dead()) == 6


def test_the_routes_are_in_the_openapi_document(admin):
    doc = admin.get("/api/openapi.json").json()
    assert {"/api/dlq", "/api/dlq/replay", "/api/dlq/purge"} <= set(doc["paths"])
    assert doc["paths"]["/api/dlq/purge"]["post"]["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/DeadPurge"}


# --------------------------------------------------------------------------- schemathesis, DLQ routes only
@pytest.fixture(scope="module")
def api_schema(server, home):
    import dlq_handlers  # noqa: F401

    with qkit.connect(home=str(home)) as q:  # the served queue's DLQ has jobs for the fuzzer to meet
        q.enqueue_many([{"type": "dlq_order", "payload": {"n": n}, "max_attempts": 1} for n in range(3)])
        q.work()
    return schema_of(server.url)


test_openapi_fuzz_of_the_dlq_routes = fuzz_test(lambda case: ADMIN, max_examples=40, path_regex="^/api/dlq")

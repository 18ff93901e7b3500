"""DLQ triage: grouping by error fingerprint and type, bulk replay of one group (API and CLI)."""
from __future__ import annotations

import json

import pytest

import qkit
from conftest import Setup
from qkit.ops.audit import audit
from qkit.errors import NotFound
from qkit.ops.explain import explain
from qkit.ops.triage import dlq_groups, fingerprint_id, replay_fingerprint

healthy: set[str] = set()  # types whose upstream has recovered


def call_upstream(payload: dict) -> dict:
    """The handler of both types below: one cause, so one fingerprint across their types."""
    kind, n = qkit.current_job().type, payload["n"]
    if kind not in healthy:
        salt = 7919 if kind == "tr_fetch" else 31
        raise ConnectionError(f"HTTP 503 from upstream for item {n} (request id {n * salt:08x}{n:08x})")
    return {"ok": n}


tr_fetch = qkit.handler("tr_fetch", timeout=10)(call_upstream)
tr_sync = qkit.handler("tr_sync", timeout=10)(call_upstream)


@qkit.handler("tr_parse", timeout=10)
def tr_parse(payload: dict) -> None:
    raise ValueError(f"field {payload['field']!r} of record {payload['n']} is not a number")


@pytest.fixture
def dlq(setup: Setup):
    """A DLQ with three groups: one fingerprint over two types, another fingerprint, and an unknown type."""
    healthy.clear()
    q = setup.connect(backoff_base=0)
    ids = {
        "fetch": q.enqueue_many([{"type": "tr_fetch", "payload": {"n": n}, "max_attempts": 2} for n in range(4)]),
        "sync": q.enqueue_many([{"type": "tr_sync", "payload": {"n": n}, "max_attempts": 1} for n in range(2)]),
        "parse": q.enqueue_many([{"type": "tr_parse", "payload": {"n": n, "field": f"f{n}"}, "max_attempts": 1}
                                 for n in range(3)]),
        "unknown": [q.enqueue("tr_nobody_handles_this", {"x": 1})],
    }
    q.work()
    assert len(q.dead()) == 10
    return q, ids


def test_dlq_groups_by_fingerprint_and_type(dlq):
    q, ids = dlq
    df = dlq_groups(q)
    assert list(df.columns) == ["fingerprint_id", "fingerprint", "type", "jobs", "first_seen", "last_seen",
                                "sample_id", "sample_error", "sample_payload", "job_ids"]
    by_type = {r["type"]: r for r in df.to_dict(orient="records")}
    assert set(by_type) == {"tr_fetch", "tr_sync", "tr_parse", "tr_nobody_handles_this"}
    assert df["jobs"].tolist() == sorted(df["jobs"].tolist(), reverse=True)  # largest group first
    fetch, sync, parse = by_type["tr_fetch"], by_type["tr_sync"], by_type["tr_parse"]
    # the exception type and the handler's own frame, whatever the message says: one fingerprint per
    # cause, shared by the two types one handler runs
    assert fetch["fingerprint"] == sync["fingerprint"] == (
        'ConnectionError at test_triage.py:call_upstream: raise ConnectionError(f"HTTP 503 from upstream for item '
        '{n} (request id {n * salt:08x}{n:08x})")')
    assert fetch["fingerprint_id"] == sync["fingerprint_id"] == fingerprint_id(fetch["fingerprint"])
    assert parse["fingerprint"] == ("ValueError at test_triage.py:tr_parse: raise ValueError(f\"field {payload['field']!r} "
                                    "of record {payload['n']} is not a number\")")
    # no traceback (the worker has no handler): the message with its variable parts masked
    assert by_type["tr_nobody_handles_this"]["fingerprint"] == (
        "UnknownJobType: no handler is registered for job type '?' in this worker")
    assert (fetch["jobs"], sync["jobs"], parse["jobs"]) == (4, 2, 3)
    assert fetch["job_ids"] == ids["fetch"] and parse["job_ids"] == ids["parse"]
    assert fetch["first_seen"] <= fetch["last_seen"]
    assert fetch["sample_id"] in ids["fetch"] and fetch["sample_payload"] == {"n": fetch["sample_id"] - ids["fetch"][0]}
    assert "HTTP 503" in fetch["sample_error"]
    # the stored fingerprint is the final attempt's (job_attempts.fingerprint)
    final = q.ledger.attempts(ids["fetch"][0])[-1]
    assert final["attempt"] == 2 and final["fingerprint"] == fetch["fingerprint"]
    assert fetch["fingerprint_id"] in explain(q, ids["fetch"][0]).verdict


def test_replay_by_fingerprint(dlq):
    q, ids = dlq
    fp = dlq_groups(q).set_index("type").loc["tr_fetch"]
    with pytest.raises(NotFound):
        replay_fingerprint(q, "0000000000")
    healthy.update({"tr_fetch", "tr_sync"})  # the upstream is back
    replayed = replay_fingerprint(q, fp["fingerprint_id"], type="tr_fetch")  # one type of the group
    assert replayed == ids["fetch"]
    assert {q.get(i).status for i in ids["sync"]} == {"failed"}
    replayed = q.replay_fingerprint(fp["fingerprint"])  # the full text works too: the rest of the group
    assert replayed == ids["sync"]
    q.work()
    assert all(q.get(i).status == "completed" for i in ids["fetch"] + ids["sync"])
    assert all(q.get(i).status == "failed" for i in ids["parse"] + ids["unknown"])
    assert set(dlq_groups(q)["type"]) == {"tr_parse", "tr_nobody_handles_this"}
    job = q.get(ids["fetch"][0])
    attempts = q.ledger.attempts(job.id)
    assert job.epoch == 1 and [(a["epoch"], a["outcome"]) for a in attempts] == [
        (0, "failed"), (0, "failed"), (1, "completed")]  # the old attempts stay, with their errors
    assert "replayed from the DLQ 1 time(s)" in explain(q, job.id).verdict
    report = audit(q)
    assert report.clean and not report.findings


def test_cli_group_and_replay(dlq, setup: Setup, monkeypatch, capsys):
    from qkit.cli import main

    q, ids = dlq
    setup.use_in_this_process(monkeypatch)
    capsys.readouterr()
    assert main(["dlq", "list", "--group", "--queue", q.name, "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert sorted(g["jobs"] for g in groups) == [1, 2, 3, 4]
    parse = next(g for g in groups if g["type"] == "tr_parse")
    assert main(["dlq", "list", "--group", "--queue", q.name]) == 0
    assert parse["fingerprint_id"] in capsys.readouterr().out
    assert main(["dlq", "replay", "--fingerprint", parse["fingerprint_id"], "--queue", q.name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"replayed": ids["parse"]}
    assert {q.get(i).status for i in ids["parse"]} == {"pending"}
    assert main(["dlq", "replay", "--fingerprint", "nope", "--queue", q.name]) == 2
    assert "has fingerprint 'nope'" in capsys.readouterr().err
    assert main(["dlq", "replay", "--all", "--fingerprint", "x", "--queue", q.name]) == 2

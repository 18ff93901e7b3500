"""Job semantics (docs/semantics.md), run on every backend x ledger pair."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import func, select

import qkit
from qkit.ledger import job_attempts, job_events, jobs
from qkit.model import MAX_PAYLOAD_BYTES

order: list[int] = []


@qkit.handler("ordered", timeout=10)
def ordered(payload: dict) -> dict:
    order.append(qkit.current_job().id)
    return {"ok": True}


@qkit.handler("always_fails", timeout=10)
def always_fails(payload: dict) -> None:
    raise RuntimeError(f"boom {payload.get('n', 0)}")


def rows(q: qkit.Queue, table, *where):
    with q.ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).where(*where)).mappings()]


def count_jobs(q: qkit.Queue) -> int:
    with q.ledger.read_engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(jobs).where(jobs.c.queue == q.name)).scalar()


def redis_state(q: qkit.Queue):
    snap = q.dispatch.snapshot()
    return snap.ready, snap.delayed, snap.leased, snap.dead


def test_priority_then_fifo(q):
    order.clear()
    spec = [0, 5, -3, 5, 0, 10, -3, 5, 0]
    ids = [q.enqueue("ordered", {"i": i}, priority=p) for i, p in enumerate(spec)]
    summary = q.work()
    assert summary.completed == len(spec)
    expected = [job_id for job_id, _ in sorted(zip(ids, spec), key=lambda x: (-x[1], x[0]))]
    assert order == expected


def test_enqueue_many_order_and_one_call(q):
    order.clear()
    before = q.backend.commands
    ids = q.enqueue_many([{"type": "ordered", "payload": {"i": i}, "priority": i % 3} for i in range(300)])
    assert len(ids) == 300 and len(set(ids)) == 300
    assert q.backend.commands - before <= 2  # one push script (plus at most a NOSCRIPT retry)
    q.work()
    assert order == [j for j, _ in sorted(((j, i % 3) for i, j in enumerate(ids)), key=lambda x: (-x[1], x[0]))]


def test_delayed_job_not_due_before_run_at(setup):
    q = setup.connect(backoff_base=0)
    order.clear()
    job_id = q.enqueue("ordered", {}, delay=1.0)
    now_id = q.enqueue("ordered", {})
    summary = q.work()
    assert order == [now_id] and summary.completed == 1
    assert q.get(job_id).status == "pending"
    stats = q.stats()
    assert stats["delayed"] == 1 and stats["due"] == 0 and stats["pending"] == 1
    # wait on Redis's own view of due-ness, then the next burst runs it
    deadline = time.monotonic() + 10
    while q.dispatch.inventory().delayed_due == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    q.work()
    job = q.get(job_id)
    assert job.status == "completed"
    attempt = rows(q, job_attempts, job_attempts.c.job_id == job_id)[0]
    assert (attempt["started_at"] - job.created_at).total_seconds() >= 0.95


def test_retries_with_full_jitter_bounds(setup):
    base, cap = 0.05, 0.15
    q = setup.connect(backoff_base=base, backoff_max=cap)
    job_id = q.enqueue("always_fails", {"n": 1}, max_attempts=5)
    deadline = time.monotonic() + 30
    while q.get(job_id).status != "failed":
        assert time.monotonic() < deadline
        q.work()
    events = [e for e in rows(q, job_events, job_events.c.job_id == job_id) if e["event"] == "retry_scheduled"]
    attempts = sorted(rows(q, job_attempts, job_attempts.c.job_id == job_id), key=lambda a: a["attempt"])
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4, 5]
    assert all(a["outcome"] == "failed" for a in attempts)
    assert len(events) == 4
    for e in events:
        n = e["detail"]["attempt"]
        assert 0 <= e["detail"]["delay_s"] <= min(cap, base * 2 ** (n - 1)) + 1e-9
    for prev, nxt, e in zip(attempts, attempts[1:], events):
        # not claimed before run_at (Redis clock vs Python clock: allow 20 ms of skew)
        assert (nxt["started_at"] - prev["finished_at"]).total_seconds() >= e["detail"]["delay_s"] - 0.02


def test_base_zero_retries_within_one_burst(q):
    job_id = q.enqueue("always_fails", {}, max_attempts=4)
    summary = q.work()
    job = q.get(job_id)
    assert job.status == "failed" and job.attempts == 4
    assert summary.retried == 3 and summary.failed == 1


def test_max_attempts_then_dlq_then_replay(q):
    payload = {"n": 7, "nested": {"ü": [1, 2.5, None]}}
    job_id = q.enqueue("always_fails", payload, max_attempts=2)
    q.work()
    job = q.get(job_id)
    assert job.status == "failed" and job.attempts == 2
    dead = q.dead()
    assert [d.id for d in dead] == [job_id]
    assert dead[0].payload == payload
    assert dead[0].error == "RuntimeError: boom 7"
    assert job_id in q.dispatch.snapshot().dead
    # replay: pending again, fresh budget, history kept
    assert q.replay(job_id) == [job_id]
    job = q.get(job_id)
    assert job.status == "pending" and job.attempts == 0 and job.epoch == 1
    assert q.dispatch.snapshot().place_of(job_id) == "ready"
    assert len(rows(q, job_attempts, job_attempts.c.job_id == job_id)) == 2
    q.work()
    assert q.get(job_id).status == "failed" and q.get(job_id).attempts == 2
    assert len(rows(q, job_attempts, job_attempts.c.job_id == job_id)) == 4
    # replaying a job that is not failed is refused, and changes nothing
    ok = q.enqueue("ordered", {})
    with pytest.raises(qkit.Conflict):
        q.replay([job_id, ok])
    assert q.get(job_id).status == "failed" and q.get(ok).status == "pending"
    assert q.replay_all() == [job_id]
    assert q.purge_dead() == 0  # nothing failed right now
    q.work()
    assert q.purge_dead() == 1
    assert q.dead() == [] and q.dispatch.snapshot().dead == set()


def test_unknown_type_goes_to_dlq_at_once(q):
    job_id = q.enqueue("no_such_type", {}, max_attempts=5)
    q.work()
    job = q.get(job_id)
    assert job.status == "failed" and job.attempts == 1
    assert "no_such_type" in job.error
    assert [d.id for d in q.dead()] == [job_id]


def test_idempotency_key_in_process(q):
    a = q.enqueue("always_fails", {"n": 1}, key="k1", max_attempts=1)
    b = q.enqueue("always_fails", {"n": 2}, key="k1", max_attempts=1)
    assert a == b and count_jobs(q) == 1
    assert q.dispatch.inventory().ready == 1
    q.work()
    assert q.get(a).status == "failed"
    c = q.enqueue("always_fails", {"n": 3}, key="k1")  # a failed job keeps its key (docs/semantics.md#idempotency)
    assert c == a and count_jobs(q) == 1 and q.get(a).payload == {"n": 1}
    assert {e["event"] for e in rows(q, job_events, job_events.c.job_id == a)} >= {"enqueued", "deduplicated"}


def test_idempotency_key_two_processes_many_threads(setup):
    code = textwrap.dedent("""
        import json, sys, threading, qkit
        q = qkit.connect(sys.argv[1])
        ids, barrier = [], threading.Barrier(25)
        def go():
            barrier.wait()
            ids.append(q.enqueue("ordered", {"x": 1}, key="same-key"))
        threads = [threading.Thread(target=go) for _ in range(25)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(json.dumps(sorted(set(ids))))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, setup.queue], env=setup.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    seen = [json.loads(o[0]) for o in outs]
    assert seen[0] == seen[1] and len(seen[0]) == 1
    q = setup.connect()
    assert count_jobs(q) == 1
    assert q.dispatch.inventory().ready == 1


def test_enqueue_many_is_all_or_nothing(q):
    q.enqueue("ordered", {"keep": True})
    before_rows, before_redis = count_jobs(q), redis_state(q)
    with pytest.raises(qkit.BadInput, match="item 2"):
        q.enqueue_many([{"type": "ordered", "payload": {}}, {"type": "ordered", "payload": {}},
                        {"type": "ordered", "payload": "not an object"}])
    assert count_jobs(q) == before_rows and redis_state(q) == before_redis


BAD_CALLS = [
    ("payload list", lambda q: q.enqueue("ordered", [1, 2]), "payload must be a JSON object"),
    ("payload str", lambda q: q.enqueue("ordered", "x"), "payload must be a JSON object"),
    ("payload not json", lambda q: q.enqueue("ordered", {"x": object()}), "not JSON"),
    ("payload nan", lambda q: q.enqueue("ordered", {"x": float("nan")}), "not JSON"),
    ("payload too big", lambda q: q.enqueue("ordered", {"x": "a" * (MAX_PAYLOAD_BYTES - 7)}), "limit is 262144"),
    ("priority high", lambda q: q.enqueue("ordered", {}, priority=1_000_001), "priority"),
    ("priority low", lambda q: q.enqueue("ordered", {}, priority=-1_000_001), "priority"),
    ("priority type", lambda q: q.enqueue("ordered", {}, priority="5"), "priority"),
    ("attempts 0", lambda q: q.enqueue("ordered", {}, max_attempts=0), "max_attempts"),
    ("attempts 101", lambda q: q.enqueue("ordered", {}, max_attempts=101), "max_attempts"),
    ("bad type", lambda q: q.enqueue("Bad Type", {}), "job type"),
    ("long type", lambda q: q.enqueue("a" * 65, {}), "job type"),
    ("unknown option", lambda q: q.enqueue("ordered", {}, colour="red"), "unknown option"),
    ("negative delay", lambda q: q.enqueue("ordered", {}, delay=-1), "delay"),
    ("huge delay", lambda q: q.enqueue("ordered", {}, delay=10**400), "delay"),
    ("nan delay", lambda q: q.enqueue("ordered", {}, delay=float("nan")), "delay"),
    ("item unknown key", lambda q: q.enqueue_many([{"type": "ordered", "payload": {}, "prio": 1}]), "unknown option"),
    ("item not object", lambda q: q.enqueue_many([3]), "item 0"),
]


@pytest.mark.parametrize("what,call,message", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_is_refused_with_nothing_written(q, what, call, message):
    q.enqueue("ordered", {"already": "queued"})
    before_rows, before_redis = count_jobs(q), redis_state(q)
    with pytest.raises(qkit.BadInput, match=message):
        call(q)
    assert count_jobs(q) == before_rows and redis_state(q) == before_redis


def test_payload_size_boundary(q):
    exact = {"x": "a" * (MAX_PAYLOAD_BYTES - len('{"x":""}'))}
    assert len(json.dumps(exact, separators=(",", ":")).encode()) == MAX_PAYLOAD_BYTES
    job_id = q.enqueue("ordered", exact)
    assert q.get(job_id).payload == exact
    with pytest.raises(qkit.BadInput):
        q.enqueue("ordered", {"x": exact["x"] + "a"})


def test_bad_queue_name_refused(setup):
    with pytest.raises(qkit.BadInput, match="queue name"):
        setup.connect(queue="Bad{Queue}")


def test_stats_shape(q):
    q.enqueue("ordered", {})
    q.enqueue("always_fails", {}, max_attempts=1)
    q.enqueue("ordered", {}, delay=60)
    q.work()
    s = q.stats()
    assert (s["pending"], s["due"], s["delayed"], s["processing"], s["completed"], s["failed"]) == (1, 0, 1, 0, 1, 1)
    assert s["success_rate"] == 0.5
    assert s["avg_exec_ms"] is not None and s["avg_exec_ms"] >= 0


def test_handler_timeout_does_not_hang_the_burst(setup, tmp_path):
    """A handler that never returns is abandoned at its timeout; the burst goes on."""
    import job_handlers  # noqa: F401 - registers the test handlers in this process

    q = setup.connect(backoff_base=0)
    log = tmp_path / "log"
    hung = q.enqueue("hang", {"log": str(log)}, max_attempts=1)
    fine = q.enqueue("record", {"log": str(log)})
    summary = q.work()
    assert q.get(hung).status == "failed" and "timeout" in q.get(hung).error
    assert q.get(fine).status == "completed"
    assert summary.failed == 1 and summary.completed == 1
    outcome = rows(q, job_attempts, job_attempts.c.job_id == hung)[0]["outcome"]
    assert outcome == "timeout"


def test_work_budget_max_jobs(q):
    ids = q.enqueue_many([{"type": "ordered", "payload": {}} for _ in range(25)])
    summary = q.work(max_jobs=10)
    assert summary.processed == 10 and summary.stopped_by == "max_jobs"
    statuses = [q.get(i).status for i in ids]
    assert statuses.count("completed") == 10 and statuses.count("pending") == 15
    assert q.dispatch.inventory().leased == 0  # nothing left holding a lease
    q.work()
    assert all(q.get(i).status == "completed" for i in ids)


@qkit.handler("unserialisable", timeout=10)
def unserialisable(payload: dict) -> object:
    deep: list = []
    for _ in range(100_000):  # too deep for json: RecursionError, not TypeError
        deep = [deep]
    return {"deep": deep} if payload.get("deep") else {"obj": object()}


def test_a_result_that_cannot_be_stored_fails_the_attempt(q):
    ids = [q.enqueue("unserialisable", {"deep": True}, max_attempts=1),
           q.enqueue("unserialisable", {}, max_attempts=1), q.enqueue("ordered", {})]
    summary = q.work()
    assert [q.get(i).status for i in ids] == ["failed", "failed", "completed"]
    assert "BadResult" in q.get(ids[0]).error and "BadResult" in q.get(ids[1]).error
    assert summary.failed == 2 and summary.completed == 1


def test_a_burst_with_a_time_budget_waits_for_retries_due_within_it(setup):
    q = setup.connect(backoff_base=0.05, backoff_max=0.2)
    job_id = q.enqueue("always_fails", {}, max_attempts=4)
    later = q.enqueue("ordered", {}, delay=3600)
    summary = q.work(max_seconds=30)
    assert q.get(job_id).status == "failed" and q.get(job_id).attempts == 4
    assert summary.retried == 3 and summary.failed == 1
    assert summary.stopped_by == "empty"  # the hour-away job is not waited for
    assert q.get(later).status == "pending"

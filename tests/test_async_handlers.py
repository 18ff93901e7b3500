"""``async def`` handlers (issue 16; docs/semantics.md#async-handlers): one event loop per burst, up to ``concurrency`` at once.

Handlers are in ``tests/async_job_handlers.py`` (and the sync ``record`` of
``tests/job_handlers.py`` for mixed queues); they log every start and end.
Concurrency is read from the attempts' intervals in the ledger, never from
wall-clock sleeps; the tests wait on state (log lines, Redis inventory).
"""
from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

from sqlalchemy import select

from conftest import Setup, spawn_burst, wait_for
from job_handlers import executions, read_log
from qkit.ledger import job_attempts, worker_runs
from qkit.ops.audit import audit, total_queue

import async_job_handlers  # noqa: F401 - the async handlers, in this process for in-process bursts
import job_handlers  # noqa: F401 - the sync ``record`` handler

AIO_ENV = {"QKIT_HANDLERS": "async_job_handlers"}


def attempts(q, ids=None) -> list[dict]:
    query = select(job_attempts).order_by(job_attempts.c.job_id, job_attempts.c.attempt)
    if ids is not None:
        query = query.where(job_attempts.c.job_id.in_(list(ids)))
    with q.ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def max_overlap(rows: list[dict]) -> int:
    """The most handlers running at one instant (an end at the same instant as a start comes first).

    An attempt's ``started_at`` is when its batch was claimed; its handler ran for ``duration_ms``
    up to ``finished_at``."""
    ends = [r["finished_at"].timestamp() for r in rows]
    starts = [end - r["duration_ms"] / 1000 for end, r in zip(ends, rows)]
    edges = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def outcomes_of(q, job_id: int) -> list[str]:
    return [a["outcome"] for a in attempts(q, [job_id])]


def test_async_handlers_complete_fail_retry_and_time_out(setup: Setup, tmp_path: Path):
    q = setup.connect(backoff_base=0)
    log = str(tmp_path / "log")
    ok = q.enqueue_many([{"type": "aio_record", "payload": {"log": log, "sleep": 0.05}} for _ in range(3)])
    flaky = q.enqueue("aio_record", {"log": log, "fail_until": 1}, max_attempts=3)
    failing = q.enqueue("aio_record", {"log": log, "fail_until": 99}, max_attempts=2)
    hang = q.enqueue("aio_hang", {"log": log}, max_attempts=1)
    summary = q.work(concurrency=4)

    for job_id in ok:
        job = q.get(job_id)
        assert job.status == "completed" and job.attempts == 1
        assert job.result == {"seen": job_id, "in_thread": job_id, "attempt": 1}
    assert q.get(flaky).status == "completed" and outcomes_of(q, flaky) == ["failed", "completed"]
    assert q.get(flaky).result["attempt"] == 2
    assert q.get(failing).status == "failed" and outcomes_of(q, failing) == ["failed", "failed"]
    assert "RuntimeError: attempt 2 fails on purpose" in q.get(failing).error
    # the timeout: outcome `timeout`, and the coroutine was cancelled (it logged its CancelledError)
    assert q.get(hang).status == "failed" and outcomes_of(q, hang) == ["timeout"]
    assert "HandlerTimeout" in attempts(q, [hang])[0]["error"]
    wait_for(lambda: ("cancelled", hang) in [(e[0], e[1]) for e in read_log(log)], timeout=10,
             what="the timed-out coroutine to see its cancellation")
    assert {failing, hang} == {j.id for j in q.dead()}
    assert (summary.completed, summary.failed, summary.retried) == (4, 2, 2)
    assert summary.fenced == 0 and summary.lost == 0
    assert audit(q).clean


def test_async_handlers_direct_their_outcomes_and_report_progress(setup: Setup):
    """qkit.Retry, qkit.Permanent and current_job().progress() work from a coroutine as from a thread."""
    q = setup.connect(backoff_base=0)
    retry = q.enqueue("aio_directed", {"do": "retry", "after": 0.3})
    permanent = q.enqueue("aio_directed", {"do": "permanent"}, max_attempts=5)
    plain = q.enqueue("aio_directed", {})
    q.work(concurrency=4, max_seconds=30)
    rows = attempts(q, [retry])
    assert [a["outcome"] for a in rows] == ["failed", "completed"] and rows[0]["retry_after_ms"] == 300
    # the second attempt started no sooner than the delay the handler named after the first ended
    second_start = rows[1]["finished_at"].timestamp() - rows[1]["duration_ms"] / 1000
    assert second_start - rows[0]["finished_at"].timestamp() >= 0.3 - 0.01
    assert q.get(permanent).status == "failed" and outcomes_of(q, permanent) == ["failed"]
    assert "Permanent" in q.get(permanent).error
    for job_id in (retry, plain):
        job = q.get(job_id)
        assert job.status == "completed" and (job.progress, job.progress_note) == (1.0, "done")
    assert (q.get(permanent).progress, q.get(permanent).progress_note) == (0.5, "half way")
    assert audit(q).clean


def test_an_async_handler_sees_its_cancel_request_and_the_others_run_on(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=0.6)  # renewals (which hand over cancel requests) every 0.2 s
    log = str(tmp_path / "log")
    target = q.enqueue("aio_cancellable", {"log": log}, priority=5)
    others = q.enqueue_many([{"type": "aio_record", "payload": {"log": log, "sleep": 0.05}} for _ in range(5)])
    result = {}
    burst = threading.Thread(target=lambda: result.update(s=q.work(concurrency=3)))
    burst.start()
    wait_for(lambda: ("start", target) in [(e[0], e[1]) for e in read_log(log)], what="the handler to start")
    assert q.cancel(target) is True
    burst.join(60)
    assert q.get(target).status == "cancelled" and q.get(target).attempts == 1
    assert all(q.get(i).status == "completed" for i in others)
    assert result["s"].cancelled == 1 and result["s"].completed == 5
    assert audit(q).clean


def test_up_to_k_async_handlers_run_at_once(setup: Setup, tmp_path: Path):
    """50 jobs of 0.2 s at concurrency 50 all overlap; at concurrency 4 never more than 4 do."""
    q = setup.connect()
    log = str(tmp_path / "log")
    wide = q.enqueue_many([{"type": "aio_record", "payload": {"log": log, "sleep": 0.2}} for _ in range(50)])
    assert q.work(concurrency=50).completed == 50
    rows = attempts(q, wide)
    assert len(rows) == 50 and {r["outcome"] for r in rows} == {"completed"}
    assert 40 <= max_overlap(rows) <= 50  # one after another they would take 10 s
    for job_id in wide:  # current_job() is each coroutine's own, also in a thread it hands work to
        assert q.get(job_id).result == {"seen": job_id, "in_thread": job_id, "attempt": 1}

    # several batches, each claimed while the one before runs (aio.overlap): still never more than 4 at once
    narrow = q.enqueue_many([{"type": "aio_record", "payload": {"log": log, "sleep": 0.02}} for _ in range(80)])
    assert q.work(concurrency=4).completed == 80
    assert 2 <= max_overlap(attempts(q, narrow)) <= 4
    assert audit(q).clean


def test_a_queue_mixing_sync_and_async_handlers(setup: Setup, tmp_path: Path):
    """Both kinds run, each exactly once, never more than `concurrency` handlers at once."""
    q = setup.connect(backoff_base=0)
    log = str(tmp_path / "log")
    items = []
    for n in range(60):
        kind = "aio_record" if n % 2 else "record"
        payload = {"log": log, "sleep": 0.02}
        if n % 5 == 0 and kind == "aio_record":
            payload["fail_until"] = 1  # a failure among them: retried, and affects no other job
        items.append({"type": kind, "payload": payload})
    ids = q.enqueue_many(items)
    summary = q.work(concurrency=8)
    assert summary.completed == 60 and summary.failed == 0
    assert all(q.get(i).status == "completed" for i in ids)
    assert max_overlap(attempts(q, ids)) <= 8
    report = total_queue(q, ids, executions(log))
    assert report.valid, report.summary()
    assert not report.duplicated


def test_max_jobs_bounds_async_jobs_as_sync_ones(setup: Setup, tmp_path: Path):
    q = setup.connect()
    log = str(tmp_path / "log")
    ids = q.enqueue_many([{"type": "aio_record", "payload": {"log": log, "sleep": 0.02}} for _ in range(30)])
    summary = q.work(max_jobs=7, concurrency=4)
    assert summary.completed == 7 and summary.stopped_by == "max_jobs"
    assert sorted(q.get(i).status for i in ids).count("completed") == 7
    assert len(attempts(q, ids)) == 7 and len([e for e in read_log(log) if e[0] == "start"]) == 7
    assert q.dispatch.inventory().ready == 23
    assert audit(q).clean


def test_sigterm_lets_async_jobs_in_flight_finish_and_releases_the_rest(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=30)
    log, release = tmp_path / "log", tmp_path / "release"
    held = q.enqueue_many([{"type": "aio_record", "payload": {"log": str(log), "wait_for": str(release)},
                            "priority": 5} for _ in range(4)])
    rest = q.enqueue_many([{"type": "aio_record", "payload": {"log": str(log)}} for _ in range(6)])
    out = tmp_path / "out"
    worker = spawn_burst(setup, "--concurrency", "4", env={**AIO_ENV, "QKIT_LEASE_SECONDS": 30}, log=out)
    wait_for(lambda: len([e for e in read_log(log) if e[0] == "start"]) == 4, what="four coroutines to start")
    worker.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in out.read_text(), what="the burst to take the signal in")
    release.touch()  # the coroutines in flight finish
    worker.wait(60)
    assert all(q.get(i).status == "completed" for i in held)
    assert all(q.get(i).status == "pending" and q.get(i).attempts == 0 for i in rest)
    assert not attempts(q, rest)  # released unrun: no attempt spent
    inv = q.dispatch.inventory()
    assert inv.leased == 0 and inv.ready == 6
    with q.ledger.read_engine.connect() as conn:
        run = conn.execute(select(worker_runs).where(worker_runs.c.queue == q.name)).mappings().one()
    assert run["status"] == "interrupted" and run["completed"] == 4
    assert audit(q).clean


def test_a_worker_killed_with_coroutines_in_flight_is_charged_one_lost_attempt_each(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=1.0, backoff_base=0)
    log, release = tmp_path / "log", tmp_path / "release"
    ids = q.enqueue_many([{"type": "aio_record", "payload": {"log": str(log), "wait_for": str(release)}}
                          for _ in range(4)])
    worker = spawn_burst(setup, "--concurrency", "4", env={**AIO_ENV, "QKIT_LEASE_SECONDS": 1.0})
    wait_for(lambda: len([e for e in read_log(log) if e[0] == "start"]) == 4, what="four coroutines to start")
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    wait_for(lambda: q.dispatch.inventory().leases_expired == 4, what="the dead worker's leases to expire")
    release.touch()
    summary = q.work(concurrency=4)
    assert summary.lost == 4 and summary.completed == 4
    for job_id in ids:
        assert outcomes_of(q, job_id) == ["lost", "completed"] and q.get(job_id).status == "completed"
    report = total_queue(q, ids, executions(log))
    assert report.valid, report.summary()


def test_a_handler_blocking_the_loop_does_not_stop_lease_renewal(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=1.0)
    log = str(tmp_path / "log")
    blocker = q.enqueue("aio_block", {"log": log, "block": 2.5}, priority=5)
    other = q.enqueue("aio_record", {"log": log, "sleep": 0.1})
    result = {}
    burst = threading.Thread(target=lambda: result.update(summary=q.work(concurrency=2)))
    burst.start()
    wait_for(lambda: ("start", blocker) in [(e[0], e[1]) for e in read_log(log)], what="the blocker to start")
    seen = []
    while burst.is_alive() and ("done", blocker) not in [(e[0], e[1]) for e in read_log(log)]:
        inv = q.dispatch.inventory()  # the loop is blocked; the renewer thread is not
        seen.append((inv.leased, inv.leases_expired))
        burst.join(0.1)
    burst.join(60)
    assert len(seen) >= 5 and all(expired == 0 for _, expired in seen), seen
    assert outcomes_of(q, blocker) == ["completed"] and outcomes_of(q, other) == ["completed"]
    assert result["summary"].fenced == 0 and result["summary"].lost == 0
    assert audit(q).clean


def test_a_loop_blocked_past_a_timeout_is_abandoned_and_the_rest_released(setup: Setup, tmp_path: Path):
    """A sync sleep inside ``async def`` past its timeout: the job times out, the jobs the blocked
    loop could not start are released (no attempt spent) and run on a new loop."""
    q = setup.connect(backoff_base=0)
    log = str(tmp_path / "log")
    blocker = q.enqueue("aio_block_past_timeout", {"log": log, "block": 3}, priority=5, max_attempts=1)
    others = q.enqueue_many([{"type": "aio_record", "payload": {"log": log, "sleep": 0.05}} for _ in range(5)])
    summary = q.work(concurrency=2)
    assert outcomes_of(q, blocker) == ["timeout"] and q.get(blocker).status == "failed"
    for job_id in others:
        assert outcomes_of(q, job_id) == ["completed"]
    assert summary.completed == 5 and summary.fenced == 0
    assert audit(q).clean


def test_a_handler_swallowing_its_cancellation_is_given_up(setup: Setup, tmp_path: Path):
    """At concurrency 1 the next jobs start once the stubborn job's timeout passed, not when it returns."""
    q = setup.connect()
    log = str(tmp_path / "log")
    stubborn = q.enqueue("aio_stubborn", {"log": log, "linger": 2.0}, priority=5, max_attempts=1)
    others = q.enqueue_many([{"type": "aio_record", "payload": {"log": log}} for _ in range(3)])
    summary = q.work(concurrency=1)
    assert outcomes_of(q, stubborn) == ["timeout"] and q.get(stubborn).result is None
    assert all(outcomes_of(q, i) == ["completed"] for i in others)
    entries = [(e[0], e[1]) for e in read_log(log)]
    assert ("cancelled", stubborn) in entries
    if ("done", stubborn) in entries:  # it may still be lingering: then the others surely went first
        assert max(entries.index(("done", i)) for i in others) < entries.index(("done", stubborn))
    assert summary.completed == 3 and summary.failed == 1
    assert audit(q).clean


def test_a_burst_runs_async_handlers_from_inside_a_running_event_loop(setup: Setup, tmp_path: Path):
    """A notebook cell runs inside the kernel's event loop: the burst's own loop runs on its own thread."""
    q = setup.connect()
    log = str(tmp_path / "log")
    ids = q.enqueue_many([{"type": "aio_record", "payload": {"log": log, "sleep": 0.02}} for _ in range(20)])

    async def cell():
        return q.work(concurrency=10)

    assert asyncio.run(cell()).completed == 20
    assert all(q.get(i).result["seen"] == i for i in ids)


def test_an_object_with_an_async_call_method_is_an_async_handler(setup: Setup):
    q = setup.connect()
    job_id = q.enqueue("aio_callable", {})
    assert q.work().completed == 1
    assert q.get(job_id).result == {"seen": job_id}


def test_debug_rerun_runs_an_async_handler_also_inside_a_running_loop(setup: Setup, tmp_path: Path):
    from qkit.analysis.debug import rerun

    q = setup.connect()
    job_id = q.enqueue("aio_record", {"log": str(tmp_path / "log")})
    plain = rerun(q, job_id)
    assert plain.ok and plain.result == {"seen": job_id, "in_thread": job_id, "attempt": 1}

    async def in_a_notebook_cell():  # Jupyter runs cells inside an event loop
        return rerun(q, job_id)

    inside = asyncio.run(in_a_notebook_cell())
    assert inside.ok and inside.result["seen"] == job_id
    assert q.get(job_id).status == "pending"  # rerun writes nothing


def test_the_async_bench_runs_both_kinds_end_to_end():
    """bench/async_io.py drains every job of both kinds and prints its JSON (no speed is judged here)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "bench" / "async_io.py"), "--n", "60", "--concurrency", "8",
                           "--repeat", "1", "--min-rate", "0", "--json"], cwd=str(root), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in lines[:-1]] == ["async", "threads"]
    assert all(r["completed"] == 60 and r["job_type"] in ("asleep", "sleep") for r in lines[:-1])
    assert lines[-1]["ok"] and {"burst_jobs_per_s", "drain_jobs_per_s"} <= set(lines[-1]["async"])

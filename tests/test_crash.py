"""Crash safety with real processes: SIGKILL, SIGSTOP, poison jobs, parallel bursts.

Workers run as ``qkit work`` subprocesses with the handlers of
``tests/job_handlers.py``; the tests synchronise on state (log lines, Redis
inventory, process exit), never on fixed sleeps.
"""
from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Iterator

from sqlalchemy import select

from conftest import Setup, held_job, run_burst, spawn_burst, stalled_past_its_lease, wait_for
from job_handlers import read_log
from qkit.ops.audit import audit
from qkit.ledger import job_attempts, job_events

import job_handlers  # noqa: F401 - same handlers in this process for in-process bursts

LEASE = 1.0
WORKER_ENV = {"QKIT_HANDLERS": "job_handlers", "QKIT_LEASE_SECONDS": LEASE, "QKIT_BACKOFF_BASE": 0}


def attempts_of(q, job_id):
    with q.ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(job_attempts).where(job_attempts.c.job_id == job_id)
                                              .order_by(job_attempts.c.attempt)).mappings()]


def events_of(q, job_id):
    with q.ledger.read_engine.connect() as conn:
        return [r.event for r in conn.execute(select(job_events.c.event).where(job_events.c.job_id == job_id)
                                              .order_by(job_events.c.id))]


def test_sigkill_mid_handler_is_reclaimed_after_lease(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    held = held_job(setup, q, tmp_path, WORKER_ENV)
    job_id, log, release, worker = held.job_id, held.log, held.release, held.worker
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    assert q.get(job_id).status == "processing"
    # the lease is still valid: a burst now must not take the job
    if q.dispatch.inventory().leases_expired == 0:
        summary = q.work()
        assert summary.processed == 0
    wait_for(lambda: q.dispatch.inventory().leases_expired == 1, what="the lease to expire")
    release.touch()
    summary = q.work()
    job = q.get(job_id)
    assert job.status == "completed" and job.attempts == 2
    assert [a["outcome"] for a in attempts_of(q, job_id)] == ["lost", "completed"]
    assert summary.lost == 1
    entries = read_log(log)
    assert [e[0] for e in entries].count("done") == 1
    assert "reclaimed" in events_of(q, job_id)
    assert audit(q).clean


def test_long_handler_is_never_reclaimed_while_its_worker_lives(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    job_id = q.enqueue("record", {"log": str(log), "sleep": 3 * LEASE + 0.3})
    worker = spawn_burst(setup, env=WORKER_ENV)
    wait_for(lambda: read_log(log), what="the handler to start")
    bursts = 0
    while worker.poll() is None:  # other bursts keep trying for the whole run
        assert q.work().processed == 0
        bursts += 1
    assert worker.returncode == 0
    assert bursts > 0
    job = q.get(job_id)
    assert job.status == "completed" and job.attempts == 1
    assert [a["outcome"] for a in attempts_of(q, job_id)] == ["completed"]
    events = events_of(q, job_id)
    assert "reclaimed" not in events and events.count("lease_renewed") == 1
    assert audit(q).clean


def test_stalled_worker_cannot_overwrite_the_attempt_that_replaced_it(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    with stalled_past_its_lease(setup, q, tmp_path, WORKER_ENV) as stall:
        stall.release.touch()
        summary = q.work()
        assert summary.completed == 1 and summary.lost == 1
        winner = summary.worker
    assert stall.summary["completed"] == 0 and stall.summary["fenced"] >= 1
    job = q.get(stall.job_id)
    assert job.status == "completed" and job.attempts == 2
    attempts = attempts_of(q, stall.job_id)
    assert [a["outcome"] for a in attempts] == ["lost", "completed"]
    assert attempts[1]["worker"] == winner
    # both executions happened (at-least-once), but the ledger holds one completion
    assert [e[0] for e in read_log(stall.log)].count("done") == 2
    assert audit(q).clean


def test_poison_job_ends_in_dlq_after_max_attempts(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    poison = q.enqueue("poison", {"log": str(log)}, max_attempts=3, priority=10)
    innocent = [q.enqueue("record", {"log": str(log)}) for _ in range(3)]
    for _ in range(12):
        if q.get(poison).status == "failed":
            break
        run_burst(setup, env=WORKER_ENV)  # dies when it meets the poison job
        wait_for(lambda: q.dispatch.inventory().leases_expired == q.dispatch.inventory().leased,
                 what="dead workers' leases to expire")
    run_burst(setup, env=WORKER_ENV)
    job = q.get(poison)
    assert job.status == "failed" and job.attempts == 3
    assert [a["outcome"] for a in attempts_of(q, poison)] == ["lost", "lost", "lost"]
    assert poison in {j.id for j in q.dead()}
    assert all(q.get(i).status == "completed" for i in innocent)
    assert [e for e in read_log(log) if e[0] == "start" and e[1] == poison].__len__() == 3
    assert audit(q).clean


def test_four_processes_drain_2000_jobs_exactly_once(setup: Setup, tmp_path: Path):
    q = setup.connect()
    log = tmp_path / "log"
    ids = q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(2000)])
    workers = [spawn_burst(setup, env={"QKIT_HANDLERS": "job_handlers"}) for _ in range(4)]
    assert [w.wait(300) for w in workers] == [0, 0, 0, 0]
    stats = q.stats()
    assert stats["completed"] == 2000 and stats["pending"] == 0 and stats["processing"] == 0
    done = [e[1] for e in read_log(log) if e[0] == "done"]
    assert sorted(done) == sorted(ids)  # every job executed exactly once
    inv = q.dispatch.inventory()
    assert (inv.ready, inv.delayed, inv.leased) == (0, 0, 0)
    assert audit(q).clean


def test_sigterm_releases_what_it_holds_and_closes_the_run(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=30)
    log, release = tmp_path / "log", tmp_path / "release"
    first = q.enqueue("record", {"log": str(log), "wait_for": str(release)}, priority=5)
    rest = q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(5)])
    out = tmp_path / "out"
    worker = spawn_burst(setup, env={"QKIT_HANDLERS": "job_handlers", "QKIT_LEASE_SECONDS": 30}, log=out)
    wait_for(lambda: read_log(log), what="the first job to start")
    worker.send_signal(signal.SIGTERM)
    # the burst has taken the signal in (it says so) before the job in hand may finish
    wait_for(lambda: "SIGTERM received" in out.read_text(), what="the burst to take the signal in")
    release.touch()  # the job in hand finishes
    worker.wait(30)
    assert q.get(first).status == "completed"
    assert all(q.get(i).status == "pending" for i in rest)  # released, not stuck for a lease
    inv = q.dispatch.inventory()
    assert inv.leased == 0 and inv.ready == 5
    from qkit.ledger import worker_runs

    with q.ledger.read_engine.connect() as conn:
        run = conn.execute(select(worker_runs).where(worker_runs.c.queue == q.name)).mappings().one()
    assert run["status"] == "interrupted" and run["finished_at"] is not None and run["completed"] == 1
    assert all(a["attempt"] == 1 for i in rest for a in attempts_of(q, i)) and not attempts_of(q, rest[0])
    assert audit(q).clean


@contextlib.contextmanager
def ledger_locked(q) -> Iterator[None]:
    """Another connection holds the ledger locked (SQLite ``BEGIN EXCLUSIVE``; PostgreSQL ``LOCK TABLE``
    on jobs and job_events) until the block ends, as a slow or stuck database would."""
    from sqlalchemy.engine import make_url

    url = make_url(q.ledger.url)
    if url.get_backend_name() == "sqlite":
        import sqlite3

        conn = sqlite3.connect(url.database, timeout=30, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("COMMIT")
            conn.close()
    else:
        import psycopg

        with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
            conn.execute("LOCK TABLE jobs, job_events IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.commit()


def test_a_locked_ledger_does_not_stop_lease_renewal(setup: Setup, tmp_path: Path):
    """The renewer records a job's first renewal in the ledger; a locked ledger must not hold back
    the Redis renewals of the jobs the worker is running (found by the nemesis soak, F29)."""
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log, go, release = tmp_path / "log", tmp_path / "go", tmp_path / "release"
    first = q.enqueue("record", {"log": str(log), "wait_for": str(go)})
    second = q.enqueue("record", {"log": str(log), "wait_for": str(release)})
    worker = spawn_burst(setup, env=WORKER_ENV)  # claims both in its first batch
    try:
        wait_for(lambda: "lease_renewed" in events_of(q, first), what="the first job's renewal")
        with ledger_locked(q):
            go.touch()  # the second job starts: its first renewal needs the ledger
            wait_for(lambda: any(e[0] == "start" and e[1] == second for e in read_log(log)),
                     what="the second job to start")
            # three leases long, the worker keeps both leases alive although its ledger writes wait
            deadline = time.monotonic() + 3 * LEASE
            while time.monotonic() < deadline:
                assert q.dispatch.inventory().leases_expired == 0
                time.sleep(0.02)
        release.touch()
        assert worker.wait(60) == 0
    finally:
        release.touch()
        if worker.poll() is None:
            worker.kill()
    for job_id in (first, second):
        job = q.get(job_id)
        assert job.status == "completed" and job.attempts == 1
        assert [a["outcome"] for a in attempts_of(q, job_id)] == ["completed"]
    assert "lease_renewed" in events_of(q, second)
    assert audit(q).clean

"""``qkit explain`` and ``qkit audit``, on situations created for real.

A SIGKILLed worker, a worker stalled with SIGSTOP past its lease, a queue
whose Redis keys were deleted (Redis lost its data), a ledger row whose Redis
entry was deleted, Redis entries with no row or a finished row, and ledger
rows damaged by hand: each time ``explain`` must say what happened and
``audit`` must count it, ``audit --repair`` must fix the Redis side, and
bursts afterwards leave every job terminal exactly once.  Other tests share
the Redis servers: only this test's queue keys are ever deleted.
"""
from __future__ import annotations

import json
import os
import signal
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, select, update

import qkit
from conftest import Setup, held_job, stalled_past_its_lease, wait_for
from job_handlers import read_log
from qkit.ops.audit import audit
from qkit.ops.explain import explain
from qkit.ledger import job_attempts, job_events, jobs, utcnow

import job_handlers  # noqa: F401 - the crash handlers, also for in-process bursts

LEASE = 1.0
WORKER_ENV = {"QKIT_HANDLERS": "job_handlers", "QKIT_LEASE_SECONDS": LEASE, "QKIT_BACKOFF_BASE": 0}
ran: list[int] = []


@qkit.handler("ax_ok", timeout=10)
def ax_ok(payload: dict) -> dict:
    ran.append(qkit.current_job().id)
    return {"ok": True}


@qkit.handler("ax_fail", timeout=10)
def ax_fail(payload: dict) -> None:
    raise RuntimeError(f"upstream said no to order {payload.get('n', 0)}")


def events_of(q, job_id):
    with q.ledger.read_engine.connect() as conn:
        return [r.event for r in conn.execute(select(job_events.c.event).where(job_events.c.job_id == job_id)
                                              .order_by(job_events.c.id))]


def drop_queue_keys(q) -> None:
    """Redis loses this queue's data (only this queue's keys: the servers are shared by the session)."""
    q.backend.pipeline([["DEL", *q.dispatch.keys]])


def assert_terminal_exactly_once(q, ids) -> None:
    for job_id in ids:
        job = q.get(job_id)
        assert job.status in ("completed", "failed"), (job_id, job.status)
        outcomes = [a["outcome"] for a in q.ledger.attempts(job_id) if a["epoch"] == job.epoch]
        assert outcomes.count("completed") == (1 if job.status == "completed" else 0), (job_id, outcomes)
        assert events_of(q, job_id).count("completed") == (1 if job.status == "completed" else 0)


def test_sigkilled_worker(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    held = held_job(setup, q, tmp_path, WORKER_ENV)
    job_id, release, worker = held.job_id, held.release, held.worker
    running = explain(q, job_id)
    holder = running.attempts[0]["worker"]
    assert running.status == "processing" and running.place == "leased"
    if running.redis["leased"]["valid"]:  # (a slow machine may already be past the lease)
        assert f"attempt 1/3 was claimed by worker {holder}" in running.verdict and "is running" in running.verdict
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    wait_for(lambda: q.dispatch.inventory().leases_expired == 1, what="the lease to expire")

    stuck = explain(q, job_id)
    assert f"leased by worker {holder} whose lease expired" in stuck.verdict
    assert "never closed" in stuck.verdict and "The next burst will reclaim it" in stuck.verdict
    report = audit(q)
    assert report.clean and report.counts == {"lease_expired": 1}  # correct, and self-healing: a notice

    release.touch()
    summary = q.work()
    assert summary.lost == 1 and summary.completed == 1
    done = explain(q, job_id)
    assert done.status == "completed" and done.place is None
    assert "Its handler was started twice" in done.verdict
    assert f"Attempt 1 was lost when worker {holder} stopped renewing its lease" in done.verdict
    assert "the process died" in done.verdict
    assert f"reclaimed by {summary.worker}" in done.verdict
    final = audit(q)
    assert final.clean and not final.findings
    assert_terminal_exactly_once(q, [job_id])


def test_lease_expired_under_a_stopped_worker(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    with stalled_past_its_lease(setup, q, tmp_path, WORKER_ENV) as stall:
        job_id = stall.job_id
        stuck = explain(q, job_id)
        holder = stuck.attempts[0]["worker"]
        assert stuck.redis["leased"]["owner"] == holder and not stuck.redis["leased"]["valid"]
        assert f"leased by worker {holder} whose lease expired" in stuck.verdict
        assert "record attempt 1 as lost (2 attempt(s) left after that)" in stuck.verdict
        assert audit(q).counts == {"lease_expired": 1}
        stall.release.touch()
        summary = q.work()
        assert summary.completed == 1 and summary.lost == 1
    assert stall.summary["fenced"] >= 1  # the stalled worker's late completion was refused

    done = explain(q, job_id)
    assert "Its handler was started twice" in done.verdict
    assert f"Attempt 1 was lost when worker {holder} stopped renewing its lease" in done.verdict
    assert f"{holder} was stalled, not dead" in done.verdict and "refused (fenced)" in done.verdict
    assert [e[0] for e in read_log(stall.log)].count("done") == 2  # both ran; the ledger holds one completion
    final = audit(q)
    assert final.clean and not final.findings
    assert_terminal_exactly_once(q, [job_id])


def test_redis_lost_the_queue_data_and_audit_rebuilds_it(setup: Setup):
    q = setup.connect(backoff_base=0, lease_seconds=30)
    finished = q.enqueue("ax_ok", {})
    dead = q.enqueue("ax_fail", {"n": 7}, max_attempts=1)
    q.work()
    ready = [q.enqueue("ax_ok", {"i": i}) for i in range(3)]
    delayed = q.enqueue("ax_ok", {}, delay=1.0)
    # a worker claims one job and dies mid-handler (Redis claim + ledger claim, never settled)
    claim = q.dispatch.claim("w-test-gone", 30_000, 1)
    q.ledger.claim(q.name, "w-test-gone", claim.claimed, claim.reclaimed, q.backoff)
    inflight = claim.claimed[0]
    assert inflight == ready[0]

    drop_queue_keys(q)
    report = audit(q)
    assert not report.clean
    expected = {"redis_lost_data": 1, "failed_not_in_dlq": 1, "pending_missing": 3, "processing_not_leased": 1}
    assert report.counts == expected
    assert {f.job_id for f in report.findings if f.code == "pending_missing"} == {ready[1], ready[2], delayed}
    assert "missing from Redis" in explain(q, ready[1]).verdict
    assert "Redis holds no lease for it" in explain(q, inflight).verdict
    assert "Redis has no DLQ entry" in explain(q, dead).verdict
    assert explain(q, finished).place is None

    fixed = audit(q, repair=True)
    assert fixed.clean and fixed.found_before_repair == expected
    assert fixed.repaired == {"pushed": 4, "dead_lettered": 1, "dropped": 0}
    assert fixed.counts == {"awaiting_reclaim": 1}  # the in-flight job waits for its claim to record the loss
    again = explain(q, delayed)
    assert again.place in ("delayed", "ready")  # rebuilt with its remaining delay (it may be due by now)
    if again.place == "delayed":
        assert "pending, delayed until" in again.verdict or "due since" in again.verdict
    assert "repaired" in events_of(q, ready[1]) and "repaired" in events_of(q, dead)

    q.work()
    if q.get(delayed).status == "pending":
        wait_for(lambda: q.dispatch.inventory().delayed_due == 1, what="the delayed job to be due")
        q.work()
    assert_terminal_exactly_once(q, [finished, dead, *ready, delayed])
    assert [a["outcome"] for a in q.ledger.attempts(inflight)] == ["lost", "completed"]
    verdict = explain(q, inflight).verdict
    assert "Attempt 1 was lost when worker w-test-gone stopped renewing its lease" in verdict
    assert dead in {j.id for j in q.dead()}
    final = audit(q)
    assert final.clean and not final.findings


def test_deleted_entry_orphans_and_stale_entries(setup: Setup):
    q = setup.connect(backoff_base=0)
    ran.clear()
    finished = q.enqueue("ax_ok", {}, priority=9)
    q.work(max_jobs=1)
    assert q.get(finished).status == "completed"
    lost_entry, kept = q.enqueue("ax_ok", {}), q.enqueue("ax_ok", {})
    q.backend.pipeline([["ZREM", q.dispatch.keys[0], str(lost_entry)]])  # the row's Redis entry is deleted
    orphan = 900_000_000 + os.getpid() % 1000  # an id no ledger row has
    q.dispatch.push([(orphan, 0, 0)])
    q.dispatch.push([(finished, 0, 0)])  # a finished job back in ready

    report = audit(q)
    assert report.counts == {"orphan_entry": 1, "pending_missing": 1, "terminal_entry": 1}
    assert {(f.code, f.job_id) for f in report.findings} == {
        ("orphan_entry", orphan), ("pending_missing", lost_entry), ("terminal_entry", finished)}
    assert "missing from Redis" in explain(q, lost_entry).verdict
    assert "has no ledger row" in explain(q, orphan).verdict and "never run" in explain(q, orphan).verdict
    assert "stale entry" in explain(q, finished).verdict
    assert "pending and ready to run" in explain(q, kept).verdict

    fixed = audit(q, repair=True)
    assert fixed.clean and not fixed.findings
    assert fixed.repaired == {"pushed": 1, "dead_lettered": 0, "dropped": 2}
    assert events_of(q, lost_entry)[-1] == "repaired" and events_of(q, finished)[-1] == "repaired"
    q.work()
    assert sorted(ran) == sorted([finished, lost_entry, kept]) and orphan not in ran
    assert_terminal_exactly_once(q, [finished, lost_entry, kept])
    assert audit(q).clean and not audit(q).findings


def test_ledger_invariants_are_checked(setup: Setup):
    q = setup.connect(backoff_base=0)
    good = q.enqueue("ax_ok", {})
    retried = q.enqueue("ax_fail", {}, max_attempts=2)
    q.work()
    assert audit(q).clean
    t0 = utcnow() - timedelta(minutes=5)

    def fake_job(**kw):
        row = dict(queue=q.name, type="ax_ok", payload={}, status="completed", priority=0, attempts=2,
                   max_attempts=3, run_at=t0, created_at=t0, updated_at=t0, started_at=t0,
                   finished_at=t0 + timedelta(seconds=30), epoch=0)
        row.update(kw)
        with q.ledger.engine.begin() as conn:
            return conn.execute(insert(jobs).values(**row).returning(jobs.c.id)).scalar_one()

    def fake_attempt(job_id, attempt, outcome, start_s, end_s):
        with q.ledger.engine.begin() as conn:
            conn.execute(insert(job_attempts).values(
                job_id=job_id, epoch=0, attempt=attempt, worker="w-fake", outcome=outcome,
                started_at=t0 + timedelta(seconds=start_s), finished_at=t0 + timedelta(seconds=end_s)))

    overlapping = fake_job()
    fake_attempt(overlapping, 1, "failed", 0, 20)
    fake_attempt(overlapping, 2, "completed", 10, 30)  # began while attempt 1 still ran
    twice = fake_job()
    fake_attempt(twice, 1, "completed", 0, 10)  # completed, then ran again
    fake_attempt(twice, 2, "completed", 10, 20)
    with q.ledger.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == good).values(status="done"))
        conn.execute(update(jobs).where(jobs.c.id == retried).values(attempts=5))
    backwards = fake_job(attempts=0, started_at=t0 - timedelta(hours=1))

    report = audit(q, repair=True)  # nothing here is repairable: ledger damage is reported, never guessed at
    codes = {(f.code, f.job_id) for f in report.findings}
    assert ("bad_status", good) in codes
    assert ("attempts_mismatch", retried) in codes and ("attempts_over_max", retried) in codes
    assert ("overlap", overlapping) in codes
    assert ("completed_mismatch", twice) in codes and ("unexplained_attempt", twice) in codes
    assert ("bad_timestamps", backwards) in codes
    assert not report.clean and report.repaired == {"pushed": 0, "dead_lettered": 0, "dropped": 0}
    assert "overlap" in explain(q, overlapping).verdict


def test_cli_explain_and_audit(setup: Setup, monkeypatch, capsys):
    from qkit.cli import main

    setup.use_in_this_process(monkeypatch)
    q = setup.connect(backoff_base=0)
    job_id = q.enqueue("ax_ok", {})
    capsys.readouterr()

    assert main(["explain", str(job_id), "--queue", q.name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "pending" and doc["place"] == "ready" and "ready to run" in doc["verdict"]
    assert main(["explain", str(job_id), "--queue", q.name]) == 0
    assert "events:" in capsys.readouterr().out

    assert main(["audit", "--queue", q.name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clean"] is True
    drop_queue_keys(q)
    assert main(["audit", "--queue", q.name]) == 1
    captured = capsys.readouterr()
    assert "pending_missing" in captured.out and "error(s) remain" in captured.err
    assert main(["audit", "--repair", "--queue", q.name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["clean"] and doc["repaired"]["pushed"] == 1 and doc["found_before_repair"]["pending_missing"] == 1
    assert main(["explain", "987654321", "--queue", q.name]) == 2
    assert "no job 987654321" in capsys.readouterr().err

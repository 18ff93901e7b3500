"""Cancel, pause/resume and promote (docs/semantics.md#cancel-pause-promote), on every backend x ledger.

Each test drives real servers: bursts run in this process (threads) or as ``qkit work`` subprocesses,
and every scenario ends with the audit (Redis against the ledger, G1-G8) clean.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qkit
from qkit.errors import NotFound
from qkit.ops.audit import audit
from qkit.ops.explain import explain

from conftest import Setup, held_job, run_burst, spawn_burst, wait_for
from job_handlers import read_log

WORKER_ENV = {"QKIT_HANDLERS": "job_handlers", "QKIT_BACKOFF_BASE": 0}

_seen: dict[int, bool] = {}  # job id -> cancel_requested, as the cooperative handler saw it on return


@qkit.handler("cp-cooperative", timeout=60)
def _cooperative(payload: dict) -> dict:
    """Works in small steps until its cancel is requested (or a minute passes)."""
    ctx = qkit.current_job()
    _seen[ctx.id] = False
    Path(payload["started"]).write_text("1")
    deadline = time.monotonic() + 60
    while not ctx.cancel_requested and time.monotonic() < deadline:
        time.sleep(0.01)
    _seen[ctx.id] = ctx.cancel_requested
    return {"stopped_early": ctx.cancel_requested}


_ran: list[tuple[str, int]] = []  # (queue, id) of the cp-gate jobs whose handler started


@qkit.handler("cp-gate", timeout=60)
def _gate(payload: dict) -> None:
    """Says it started, then waits for the release file."""
    _ran.append((qkit.current_job().queue, qkit.current_job().id))
    Path(payload["started"]).write_text("1")
    deadline = time.monotonic() + 60
    while not Path(payload["release"]).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


@qkit.handler("cp-noop", timeout=10)
def _noop(payload: dict) -> None:
    return None


def _clean(q: qkit.Queue) -> None:
    report = audit(q)
    assert report.clean, report.summary()


def _depth_matches_status(q: qkit.Queue) -> None:
    """The depth chart, rebuilt from the events, ends where the ledger's counts are."""
    from qkit import frames

    last = frames.queue_depth(q).iloc[-1]
    counts = q.stats()
    assert {s: int(last[s]) for s in ("processing", "completed", "failed", "cancelled")} == \
        {s: counts[s] for s in ("processing", "completed", "failed", "cancelled")}
    assert int(last["pending"] + last["delayed"]) == counts["pending"]


def _events(q: qkit.Queue, job_id: int) -> list[str]:
    """The job's events in order, without ``lease_renewed`` (a background writer adds those late)."""
    return [e["event"] for e in q.ledger.events(job_id) if e["event"] != "lease_renewed"]


# ---------------------------------------------------------------- cancel
def test_cancel_pending_and_delayed_jobs_never_run(q: qkit.Queue, setup: Setup, tmp_path: Path) -> None:
    log = tmp_path / "log"
    due = q.enqueue("record", {"log": str(log)}, key="k-due")
    later = q.enqueue("record", {"log": str(log)}, delay=3600)
    keep = q.enqueue("record", {"log": str(log)})
    assert q.cancel(due) is True and q.cancel(later) is True
    assert q.cancel(due) is False  # terminal now
    for job_id in (due, later):
        job = q.get(job_id)
        assert job.status == "cancelled" and job.attempts == 0 and job.finished_at is not None
        assert _events(q, job_id)[-1] == "cancelled"
    snap = q.dispatch.snapshot()
    assert {due, later}.isdisjoint(snap.ready | set(snap.delayed) | set(snap.leased) | snap.dead)
    # not a failure, not in the DLQ, not in the success rate; its idempotency key stays held
    stats = q.stats()
    assert (stats["cancelled"], stats["failed"], stats["pending"]) == (2, 0, 1)
    assert q.dead() == [] and stats["success_rate"] is None
    assert q.enqueue("record", {"log": str(log)}, key="k-due") == due
    assert "before it ever ran" in explain(q, later).verdict
    done = run_burst(setup, env=WORKER_ENV)
    assert done.returncode == 0, done.stderr
    assert [row[1] for row in read_log(log) if row[0] == "start"] == [keep]
    assert q.get(keep).status == "completed" and q.stats()["success_rate"] == 1.0
    _depth_matches_status(q)
    _clean(q)


def test_cancel_unknown_id_and_other_queue(q: qkit.Queue, setup: Setup) -> None:
    with pytest.raises(NotFound, match="no job 999999999"):
        q.cancel(999999999)
    other = setup.connect(queue=setup.queue + "-other")
    job_id = other.enqueue("cp-noop")
    with pytest.raises(NotFound):
        q.cancel(job_id)
    assert other.get(job_id).status == "pending"


def test_cancel_a_processing_job_cooperatively(setup: Setup, tmp_path: Path) -> None:
    """The handler learns of the cancel at its worker's next lease renewal and stops early; the job
    ends cancelled, its attempt keeps what happened (completed)."""
    q = setup.connect(backoff_base=0, lease_seconds=0.6)  # renewals every 0.2 s
    started = tmp_path / "started"
    job_id = q.enqueue("cp-cooperative", {"started": str(started)})
    result: dict = {}
    burst = threading.Thread(target=lambda: result.update(s=q.work(max_jobs=1)))
    burst.start()
    wait_for(started.exists, what="the handler to start")
    assert q.get(job_id).status == "processing"
    assert q.cancel(job_id) is True
    assert q.cancel(job_id) is True  # asked again while still running: still a request, recorded once
    burst.join(60)
    assert _seen[job_id] is True
    job = q.get(job_id)
    assert job.status == "cancelled" and job.attempts == 1
    assert [a["outcome"] for a in q.ledger.attempts(job_id)] == ["completed"]
    events = _events(q, job_id)
    assert events.count("cancel_requested") == 1 and events[-1] == "cancelled"
    assert result["s"].cancelled == 1 and result["s"].completed == 0
    assert q.ledger.cancel_requested(q.name) == []  # the request was carried out
    assert q.cancel(job_id) is False
    _clean(q)


def test_cancel_of_a_claimed_job_whose_handler_has_not_started(setup: Setup, tmp_path: Path) -> None:
    """A job claimed in the same batch as a running one (processing in the ledger, not started): once its
    worker learns of the cancel it never starts it; the job ends cancelled without an attempt."""
    q = setup.connect(backoff_base=0, lease_seconds=0.6)  # renewals every 0.2 s
    release = tmp_path / "release"
    first = q.enqueue("cp-gate", {"started": str(tmp_path / "a"), "release": str(release)})
    second = q.enqueue("cp-gate", {"started": str(tmp_path / "b"), "release": str(release)})
    result: dict = {}
    burst = threading.Thread(target=lambda: result.update(s=q.work()))
    burst.start()
    wait_for((tmp_path / "a").exists, what="the first handler to start")
    assert q.get(second).status == "processing"  # claimed with the first one, waiting its turn
    assert q.cancel(second) is True
    for _ in range(2):  # two renewals of the batch's leases after the cancel: the worker has the flag
        deadline = q.dispatch.snapshot().leased[first][0]
        wait_for(lambda: q.dispatch.snapshot().leased[first][0] > deadline, what="a lease renewal")
    release.write_text("go")
    burst.join(60)
    assert (q.name, second) not in _ran and (q.name, first) in _ran
    job = q.get(second)
    assert job.status == "cancelled" and job.attempts == 0 and q.ledger.attempts(second) == []
    assert _events(q, second)[-1] == "cancelled" and "cancel_requested" in _events(q, second)
    assert (result["s"].completed, result["s"].cancelled) == (1, 1)
    assert q.get(first).status == "completed"
    _depth_matches_status(q)
    _clean(q)


def test_cancel_of_a_processing_job_its_handler_never_reads(q: qkit.Queue, setup: Setup, tmp_path: Path) -> None:
    """A handler that ignores the flag and returns after the cancel: the job still ends cancelled (the
    ledger decides at settle), not completed, and nothing runs it again."""
    held = held_job(setup, q, tmp_path, env={**WORKER_ENV, "QKIT_LEASE_SECONDS": 30})
    assert q.cancel(held.job_id) is True
    assert "Its cancel was requested at" in explain(q, held.job_id).verdict
    held.release.write_text("go")
    assert held.worker.wait(60) == 0
    job = q.get(held.job_id)
    assert job.status == "cancelled"
    verdict = explain(q, held.job_id).verdict
    assert f"Job {held.job_id} was cancelled at" in verdict and "while attempt 1 ran (that attempt ended completed)" \
        in verdict, verdict
    assert [a["outcome"] for a in q.ledger.attempts(held.job_id)] == ["completed"]
    assert [row[0] for row in read_log(held.log)] == ["start", "done"]
    _clean(q)


def test_cancel_of_a_failing_processing_job_is_not_retried(q: qkit.Queue, setup: Setup, tmp_path: Path) -> None:
    log, release = tmp_path / "log", tmp_path / "release"
    job_id = q.enqueue("fail", {"log": str(log), "wait_for": str(release)}, max_attempts=3)
    worker = spawn_burst(setup, env=WORKER_ENV)
    wait_for(lambda: read_log(log), what="the handler to start")
    assert q.cancel(job_id) is True
    release.write_text("go")
    assert worker.wait(60) == 0
    job = q.get(job_id)
    assert job.status == "cancelled" and job.attempts == 1 and "fails" in (job.error or "")
    assert [a["outcome"] for a in q.ledger.attempts(job_id)] == ["failed"]
    assert q.dead() == []
    _depth_matches_status(q)
    _clean(q)


def test_cancel_while_the_lease_is_lost_ends_cancelled_at_reclaim(setup: Setup, tmp_path: Path) -> None:
    """The worker running a job whose cancel was requested dies: the reclaim records the lost attempt
    and ends the job cancelled instead of retrying it."""
    import os
    import signal

    q = setup.connect(backoff_base=0)
    held = held_job(setup, q, tmp_path, env={**WORKER_ENV, "QKIT_LEASE_SECONDS": 1})
    assert q.cancel(held.job_id) is True
    os.kill(held.worker.pid, signal.SIGKILL)
    held.worker.wait(30)
    wait_for(lambda: q.dispatch.inventory().leases_expired == 1, what="the lease to expire")
    done = run_burst(setup, env=WORKER_ENV)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["cancelled"] == 1 and summary["completed"] == 0
    job = q.get(held.job_id)
    assert job.status == "cancelled"
    assert [a["outcome"] for a in q.ledger.attempts(held.job_id)] == ["lost"]
    assert [row[0] for row in read_log(held.log)] == ["start"]  # never ran again
    _depth_matches_status(q)
    _clean(q)


def test_cancel_of_a_limited_types_job_leaves_no_type_entry(q: qkit.Queue) -> None:
    q.limit("cp-noop", concurrency=1)
    gone, kept = q.enqueue("cp-noop"), q.enqueue("cp-noop")
    types_key = q.dispatch.keys[9]
    assert q.cancel(gone) is True
    snap = q.dispatch.snapshot()
    assert gone not in snap.ready and kept in snap.ready
    assert [q.backend.pipeline([["HGET", types_key, str(i)]])[0] for i in (gone, kept)] == [None, "cp-noop"]
    assert q.work().completed == 1 and q.get(kept).status == "completed"
    _clean(q)


def test_cancel_terminal_jobs_returns_false(q: qkit.Queue) -> None:
    ok = q.enqueue("cp-noop")
    q.work()
    assert q.get(ok).status == "completed"
    assert q.cancel(ok) is False
    assert q.get(ok).status == "completed"


def test_cancel_racing_a_claim(setup: Setup, tmp_path: Path) -> None:
    """Many jobs, a burst in another process claiming them while this process cancels them: each job
    either ran (cancel returned False, or it was processing and ends cancelled with its one attempt)
    or never ran (cancelled, no attempt), nothing ran twice, and the ledger and Redis agree."""
    q = setup.connect(backoff_base=0)
    log = tmp_path / "log"
    # ~1.2 s of work in claims of ~0.5 s each (qkit.engine.worker.TARGET_BATCH_SECONDS): cancels from the tail
    # reach jobs not yet claimed, claimed and waiting in a batch, running, and finished
    n = 400
    ids = q.enqueue_many([{"type": "record", "payload": {"log": str(log), "sleep": 0.003}} for _ in range(n)])
    worker = spawn_burst(setup, env={**WORKER_ENV, "QKIT_LEASE_SECONDS": 1})
    wait_for(lambda: read_log(log), what="the burst to start running jobs")
    answers = {}
    for job_id in reversed(ids):  # from the tail, towards the burst's claims
        answers[job_id] = q.cancel(job_id)
    assert worker.wait(120) == 0
    starts: dict[int, int] = {}
    for what, job_id, _attempt, _pid in read_log(log):
        if what == "start":
            starts[job_id] = starts.get(job_id, 0) + 1
    assert all(count == 1 for count in starts.values()), "a job ran twice"
    kinds = {"ran, cancel refused": 0, "ran, ended cancelled": 0, "never ran": 0}
    for job_id in ids:
        job = q.get(job_id)
        attempts = q.ledger.attempts(job_id)
        if answers[job_id] is False:
            assert job.status == "completed" and starts.get(job_id) == 1
            kinds["ran, cancel refused"] += 1
        elif job_id in starts:
            assert job.status == "cancelled" and len(attempts) == 1
            assert "cancel_requested" in _events(q, job_id)
            kinds["ran, ended cancelled"] += 1
        else:
            assert job.status == "cancelled" and attempts == [] and job.attempts == 0
            kinds["never ran"] += 1
    assert kinds["never ran"] > 0 and kinds["ran, cancel refused"] > 0, kinds
    assert q.ledger.cancel_requested(q.name) == []
    _clean(q)


# ---------------------------------------------------------------- pause / resume
def test_pause_claims_nothing_at_one_command_per_burst(q: qkit.Queue, setup: Setup) -> None:
    ids = q.enqueue_many([{"type": "cp-noop"} for _ in range(5)])
    assert q.paused is False
    assert q.pause() is True and q.pause() is False
    assert q.paused is True
    before = q.backend.counters()["commands"]
    summary = q.work(max_seconds=5)
    assert q.backend.counters()["commands"] - before == 1
    assert summary.processed == 0 and summary.stopped_by == "paused"
    assert all(q.get(i).status == "pending" for i in ids)
    # another process sees the pause too (the CLI's burst)
    done = run_burst(setup, env=WORKER_ENV)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["stopped_by"] == "paused"
    _clean(q)
    assert q.resume() is True and q.resume() is False and q.paused is False
    assert q.work().completed == 5
    _clean(q)


def test_pause_stops_a_running_burst_from_claiming_more(setup: Setup, tmp_path: Path) -> None:
    q = setup.connect(backoff_base=0)
    log = tmp_path / "log"
    q.enqueue_many([{"type": "record", "payload": {"log": str(log), "sleep": 0.02}} for _ in range(300)])
    worker = spawn_burst(setup, env=WORKER_ENV, log=tmp_path / "out")
    wait_for(lambda: read_log(log), what="the burst to start")
    q.pause()
    assert worker.wait(120) == 0
    summary = json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])
    assert summary["stopped_by"] == "paused" and 0 < summary["completed"] < 300
    assert q.stats()["pending"] == 300 - summary["completed"]
    _clean(q)


def test_pause_survives_redis_losing_it(q: qkit.Queue) -> None:
    q.enqueue("cp-noop")
    q.pause()
    q.backend.run("pause", [q.dispatch.keys[7]], ["0"])  # as if Redis restarted without it
    report = audit(q)
    assert [f.code for f in report.errors] == ["pause_mismatch"]
    repaired = audit(q, repair=True)
    assert repaired.clean and q.dispatch.inventory().paused
    q.backend.run("pause", [q.dispatch.keys[7]], ["0"])
    assert q.work().stopped_by == "paused"  # the burst's drift check restores it from the ledger
    assert q.dispatch.inventory().paused and q.stats()["pending"] == 1
    q.resume()
    assert q.work().completed == 1


def test_the_main_job_refuses_to_wait_on_a_paused_queue(q: qkit.Queue) -> None:
    from qkit.mainjob import drain

    q.enqueue("cp-noop")
    q.pause()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"queue {q.name} is paused: resume it first"):
        drain(q, q.name, total=1, deadline=started + 60, say=lambda *_: None)
    assert time.monotonic() - started < 30 and q.stats()["pending"] == 1


# ---------------------------------------------------------------- promote
def test_promote_a_delayed_job(q: qkit.Queue) -> None:
    later = q.enqueue("cp-noop", delay=3600)
    due = q.enqueue("cp-noop")
    assert q.promote(due) is False  # not delayed
    assert q.work().completed == 1
    assert q.get(later).status == "pending"
    assert q.promote(later) is True
    assert q.promote(later) is False
    assert "promoted" in _events(q, later)
    assert q.get(later).run_at <= qkit.ledger.utcnow()
    assert q.work().completed == 1 and q.get(later).status == "completed"
    assert q.promote(later) is False
    with pytest.raises(NotFound):
        q.promote(987654321)
    _clean(q)


# ---------------------------------------------------------------- the command line
def _cli(setup: Setup, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "qkit.cli", *args, "--queue", setup.queue], env=setup.env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_cancel_pause_resume_promote(q: qkit.Queue, setup: Setup) -> None:
    pending, later, done = q.enqueue("cp-noop"), q.enqueue("cp-noop", delay=3600), q.enqueue("cp-noop")
    q.cancel(done)
    out = _cli(setup, "cancel", str(pending))
    assert out.returncode == 0 and out.stdout.strip() == f"job {pending}: cancelled (it will not run)", out.stderr
    out = _cli(setup, "cancel", str(pending), "--json")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.strip() == f"qkit: job {pending} is cancelled: only a pending, delayed or running job can be cancelled"
    out = _cli(setup, "promote", str(later), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"id": later, "queue": setup.queue, "promoted": True}
    out = _cli(setup, "promote", str(later))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"qkit: job {later} is not delayed (already due): only a delayed job can be promoted")
    out = _cli(setup, "pause", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"queue": setup.queue, "paused": True, "changed": True}
    assert q.paused
    out = _cli(setup, "pause")
    assert out.returncode == 0 and out.stdout.strip() == f"queue {setup.queue}: paused (it already was paused)"
    out = _cli(setup, "resume")
    assert out.returncode == 0 and out.stdout.strip() == f"queue {setup.queue}: running" and not q.paused
    assert q.work().completed == 1  # the promoted job; the cancelled one never runs
    assert (q.get(later).status, q.get(pending).status) == ("completed", "cancelled")


@pytest.mark.parametrize("args, needle", [
    (("cancel", "0"), "0 is not in the range"),
    (("cancel", "abc"), "'abc' is not a valid integer"),
    (("cancel", "99999999999"), "no job 99999999999"),
    (("promote", "-5"), "No such option"),
    (("promote", "99999999999"), "no job 99999999999"),
    (("pause", "extra"), "unexpected extra argument"),
])
def test_cli_bad_input_is_one_line_exit_2(q: qkit.Queue, setup: Setup, args: tuple, needle: str) -> None:
    job_id = q.enqueue("cp-noop")
    out = _cli(setup, *args)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and needle in out.stderr, out.stderr
    assert q.get(job_id).status == "pending" and not q.paused  # nothing changed


def test_queue_depth_moves_cancelled_jobs_out_of_the_state_they_left(tmp_path: Path) -> None:
    """The depth chart's SQL: a cancel takes a job out of pending (cancelled while waiting, or after a
    released or reclaimed attempt, which those events already moved) or out of processing."""
    from datetime import datetime, timedelta, timezone

    import pandas as pd

    from qkit import frames
    from qkit.ledger import Ledger, job_events, jobs

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.init_schema()
    t = datetime(2025, 1, 1, tzinfo=timezone.utc)
    with ledger.engine.begin() as conn:
        conn.execute(jobs.insert(), [dict(id=i, queue="d", type="x", payload={}, status="cancelled", priority=0,
                                          attempts=0, max_attempts=3, run_at=t, created_at=t, updated_at=t, epoch=0)
                                     for i in (1, 2, 3, 4)])
        ev = [(1, 0, "enqueued", None), (1, 1, "cancelled", {"from": "pending"}),
              (2, 0, "enqueued", None), (2, 1, "claimed", {"attempt": 1}),
              (2, 3, "cancelled", {"attempt": 1, "outcome": "completed"}),
              (3, 0, "enqueued", None), (3, 1, "claimed", {"attempt": 1}), (3, 4, "released", {"attempt": 1}),
              (3, 4, "cancelled", {"attempt": 1, "outcome": "released"}),
              (4, 0, "enqueued", None), (4, 1, "claimed", {"attempt": 1}), (4, 5, "reclaimed", {"lost_attempt": 1}),
              (4, 5, "cancelled", {"attempt": 1, "outcome": "lost"})]
        conn.execute(job_events.insert(), [dict(job_id=j, at=t + timedelta(seconds=s), event=e, worker="w", detail=d)
                                           for j, s, e, d in ev])
    try:
        from types import SimpleNamespace

        depth = frames.queue_depth(SimpleNamespace(name="d", ledger=ledger), freq="1s", now=t + timedelta(seconds=60))
        at = lambda s: {k: int(v) for k, v in depth.loc[pd.Timestamp(t + timedelta(seconds=s))].items()}  # noqa: E731
        zero = dict.fromkeys(frames.DEPTH_STATES, 0)
        assert at(0) == {**zero, "pending": 4}
        assert at(1) == {**zero, "processing": 3, "cancelled": 1}
        assert at(3) == {**zero, "processing": 2, "cancelled": 2}
        assert at(4) == {**zero, "processing": 1, "cancelled": 3}
        assert at(5) == {**zero, "cancelled": 4}
    finally:
        ledger.close()

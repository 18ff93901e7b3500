"""Fault injection: the F-scenarios of the reliability research that earlier suites did not cover.

Each test names its scenario (F2, F3, ...) and ends with Jepsen's total-queue
check (:func:`qkit.ops.audit.total_queue`: lost, unexpected, duplicated,
recovered, plus the G1-G8 audit), printed so a failing run shows the counts.
Crash points are ``QKIT_CRASH_AT`` (:mod:`qkit.engine.faults`): the worker or
enqueuer SIGKILLs itself between the two writes of a step.  The map from
every F-id to its test is ``docs/reliability.md``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine, select, text

import qkit
from conftest import Setup, held_job, run_burst, spawn_burst, wait_for
from job_handlers import executions, read_log
from qkit.ops.audit import total_queue
from qkit.ledger import job_attempts, job_events, worker_runs
from qkit.dev.servers import start_redis

import job_handlers  # noqa: F401 - same handlers in this process for in-process bursts

LEASE = 1.0
WORKER_ENV = {"QKIT_HANDLERS": "job_handlers", "QKIT_LEASE_SECONDS": LEASE, "QKIT_BACKOFF_BASE": 0}


def outcomes_of(q: qkit.Queue, job_id: int) -> list[str | None]:
    with q.ledger.read_engine.connect() as conn:
        return list(conn.execute(select(job_attempts.c.outcome).where(job_attempts.c.job_id == job_id)
                                 .order_by(job_attempts.c.epoch, job_attempts.c.attempt)).scalars())


def events_of(q: qkit.Queue, job_id: int) -> list[tuple[str, object]]:
    with q.ledger.read_engine.connect() as conn:
        return [(r.event, r.at) for r in conn.execute(select(job_events.c.event, job_events.c.at)
                                                      .where(job_events.c.job_id == job_id).order_by(job_events.c.id))]


def checked(q: qkit.Queue, acknowledged, log: Path | None = None, **kw):
    """The total-queue report, printed; fails the test unless valid."""
    report = total_queue(q, acknowledged, executions(log) if log else (), **kw)
    print(f"[{q.name}] {report.summary()}")
    assert report.valid, report.summary() + "\n" + report.audit.summary()
    return report


def crash_burst(setup: Setup, point: str, **env) -> subprocess.CompletedProcess:
    """A ``qkit work`` burst armed to SIGKILL itself at ``point``; asserts it did."""
    done = run_burst(setup, env={**WORKER_ENV, "QKIT_CRASH_AT": point, **env})
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)
    assert f"crash point {point.split(':')[0]} reached" in done.stderr
    return done


def crashed_at(setup: Setup, tmp_path: Path, point: str, job_type: str = "record",
               max_attempts: int = 3) -> tuple[qkit.Queue, int, Path]:
    """One job, and a burst that SIGKILLed itself at ``point`` while handling it: (queue, job id, side-effect log)."""
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    job_id = q.enqueue(job_type, {"log": str(log)}, max_attempts=max_attempts)
    crash_burst(setup, point)
    return q, job_id, log


def expire_leases(q: qkit.Queue, n: int = 1) -> None:
    wait_for(lambda: q.dispatch.inventory().leases_expired == n, what=f"{n} lease(s) to expire")


def expire_all_leases(q: qkit.Queue) -> None:
    """Wait until every lease in Redis has expired (a dead burst held a whole batch)."""
    def all_expired() -> bool:
        inv = q.dispatch.inventory()
        return inv.leased == inv.leases_expired
    wait_for(all_expired, what="every lease to expire")


# --------------------------------------------------------------------------- crash points in the worker
def test_f02_crash_between_redis_claim_and_ledger_record(setup: Setup, tmp_path: Path):
    q, job_id, log = crashed_at(setup, tmp_path, "claim.after_redis")
    # leased in Redis, still pending in the ledger, nothing ran
    assert q.get(job_id).status == "pending" and read_log(log) == []
    assert q.dispatch.inventory().leased == 1
    expire_leases(q)
    summary = q.work()
    job = q.get(job_id)
    assert job.status == "completed" and job.attempts == 1 and summary.completed == 1
    assert outcomes_of(q, job_id) == ["completed"]
    checked(q, [job_id], log)


def test_f02b_crash_after_the_claim_is_recorded(setup: Setup, tmp_path: Path):
    q, job_id, log = crashed_at(setup, tmp_path, "claim.after_ledger")
    assert q.get(job_id).status == "processing" and read_log(log) == []
    expire_leases(q)
    assert q.work().lost == 1
    assert outcomes_of(q, job_id) == ["lost", "completed"]
    checked(q, [job_id], log)


def test_f03_crash_after_completion_commit_before_redis_ack(setup: Setup, tmp_path: Path):
    q, job_id, log = crashed_at(setup, tmp_path, "complete.after_ledger")
    assert q.get(job_id).status == "completed" and q.dispatch.inventory().leased == 1
    expire_leases(q)
    summary = q.work()
    # the reclaimer saw "completed": the entry is dropped, no new attempt, the handler ran once
    assert summary.processed == 0 and summary.lost == 0
    assert outcomes_of(q, job_id) == ["completed"] and len(executions(log)) == 1
    inv = q.dispatch.inventory()
    assert inv.ready + inv.delayed + inv.leased + inv.dead == 0
    checked(q, [job_id], log)


def test_f04_crash_after_the_handler_returned_before_the_commit(setup: Setup, tmp_path: Path):
    q, job_id, log = crashed_at(setup, tmp_path, "complete.before_ledger")
    assert q.get(job_id).status == "processing" and len(executions(log)) == 1
    expire_leases(q)
    q.work()
    # the documented duplicate: the first run's result was never recorded
    assert outcomes_of(q, job_id) == ["lost", "completed"]
    report = checked(q, [job_id], log)
    assert report.duplicated == [job_id] and not report.unexplained


def test_f04_retry_committed_before_redis_ack(setup: Setup, tmp_path: Path):
    q, job_id, log = crashed_at(setup, tmp_path, "retry.after_ledger", "fail", max_attempts=2)
    assert q.get(job_id).status == "pending" and q.get(job_id).attempts == 1
    expire_leases(q)
    q.work()
    # the committed retry is honoured, not counted again as a lost attempt
    assert outcomes_of(q, job_id) == ["failed", "failed"]
    assert q.get(job_id).status == "failed" and [j.id for j in q.dead()] == [job_id]
    checked(q, [job_id])


def test_f04_dead_letter_committed_before_redis_ack(setup: Setup, tmp_path: Path):
    q, job_id, log = crashed_at(setup, tmp_path, "dead.after_ledger", "fail", max_attempts=1)
    assert q.get(job_id).status == "failed" and q.dispatch.inventory().dead == 0
    expire_leases(q)
    assert q.work().processed == 0
    assert q.dispatch.inventory().dead == 1 and outcomes_of(q, job_id) == ["failed"]
    assert len(read_log(log)) == 1  # never ran again
    checked(q, [job_id])


def test_crash_point_names_are_checked(setup: Setup):
    q = setup.connect()
    job_id = q.enqueue("record", {"log": "/dev/null"})
    done = run_burst(setup, env={**WORKER_ENV, "QKIT_CRASH_AT": "claim.after_nothing"})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown crash point" in done.stderr
    assert q.dispatch.inventory().ready == 1 and q.get(job_id).status == "pending"  # refused before any write


# --------------------------------------------------------------------------- enqueue
def test_f13_crash_between_ledger_insert_and_redis_push(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    env = setup.env(QKIT_CRASH_AT="enqueue.after_ledger")
    done = subprocess.run([sys.executable, "-m", "qkit.cli", "enqueue", "record", "--queue", setup.queue,
                           "--key", "k1", "--payload", json.dumps({"log": str(log)})],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and done.stdout == ""  # the caller never got an id
    [row] = q.jobs()
    assert row.status == "pending" and q.dispatch.inventory().ready == 0
    # the caller retries with its key: the same job, no second row
    assert q.enqueue("record", {"log": str(log)}, key="k1") == row.id
    q.work()
    assert q.get(row.id).status == "completed"
    checked(q, [row.id], log)


def test_f13_without_a_retry_the_next_burst_pushes_the_orphaned_row(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    done = subprocess.run([sys.executable, "-m", "qkit.cli", "enqueue", "record", "--queue", setup.queue,
                           "--payload", json.dumps({"log": str(log)})],
                          env=setup.env(QKIT_CRASH_AT="enqueue.after_ledger"), capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    [row] = q.jobs()
    assert q.work().completed == 1
    checked(q, [], log, attempted=[row.id])


def test_f13_reverse_order_a_redis_entry_without_a_ledger_row_never_runs(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    real = q.enqueue("record", {"log": str(log)})
    ghost = real + 1000
    q.dispatch.push([(ghost, 5, 0)], mode="new")  # as if Redis were written first and the ledger never
    summary = q.work()
    assert summary.completed == 1 and [e[1] for e in read_log(log)] == [real, real]
    inv = q.dispatch.inventory()
    assert inv.ready + inv.leased + inv.delayed == 0
    report = checked(q, [real], log)
    assert report.unexpected == []


# --------------------------------------------------------------------------- Redis faults
@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server with an append-only file fsynced on every write, restartable on the same port and data."""
    server = start_redis(tmp_path, extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    yield server
    server.stop()


def tcp_setup(setup_name: str, server, tmp_path: Path, queue: str) -> Setup:
    db = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return Setup(name=setup_name, queue=queue, home=tmp_path,
                 overrides={"home": tmp_path, "redis_url": server.url, "database_url": db},
                 env_vars={"QKIT_HOME": str(tmp_path), "QKIT_REDIS_URL": server.url, "QKIT_DATABASE_URL": db})


def test_f09_redis_killed_between_claim_and_ack_then_restarted(own_redis, tmp_path: Path):
    s = tcp_setup("f09", own_redis, tmp_path, "f09")
    q = s.connect(lease_seconds=LEASE, backoff_base=0)
    log, release = tmp_path / "log", tmp_path / "release"
    first = q.enqueue("record", {"log": str(log), "wait_for": str(release)}, priority=9)
    rest = q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(20)])
    out = tmp_path / "worker.out"
    worker = spawn_burst(s, env=WORKER_ENV, log=out)
    wait_for(lambda: read_log(log), what="the first handler to start")
    own_redis.crash()
    release.touch()
    t0 = time.monotonic()
    assert worker.wait(30) == 1
    assert time.monotonic() - t0 < LEASE + 5
    lines = out.read_text().strip().splitlines()
    # at most a warning that the Redis write is being retried, one that renewals fail, and the error
    assert len(lines) <= 3 and "QKIT_REDIS_URL" in lines[-1] and "Traceback" not in "".join(lines), lines
    # the ledger committed the first job's completion before Redis was told
    assert q.get(first).status == "completed"
    own_redis.restart()
    expire_all_leases(q)
    q.work()
    assert all(q.get(j).status == "completed" for j in [first, *rest])
    report = checked(q, [first, *rest], log)
    assert report.duplicated == []


def test_f10_redis_lost_its_data_and_the_next_burst_rebuilds_it(own_redis, tmp_path: Path):
    s = tcp_setup("f10", own_redis, tmp_path, "f10")
    q = s.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    ids = q.enqueue_many([{"type": "record", "payload": {"log": str(log)}, "priority": i % 3}
                          for i in range(30)])
    q.enqueue("record", {"log": str(log)}, delay=0.3)
    ids.append(ids[-1] + 1)
    own_redis.client().flushall()
    q.work(max_seconds=5)  # no audit, no repair command: the burst's own check rebuilds Redis
    assert {q.get(j).status for j in ids} == {"completed"}
    report = checked(q, ids, log)
    assert report.duplicated == []


def test_f11_redis_unreachable_for_the_whole_burst(setup: Setup, tmp_path: Path):
    if setup.name != "redis-postgres":
        pytest.skip("one TCP Redis URL is enough")
    from redis_servers import free_port

    q = setup.connect()
    job_id = q.enqueue("record", {"log": str(tmp_path / "log")})
    before = q.get(job_id)
    url = f"redis://:sentinel-pw@127.0.0.1:{free_port()}/0"
    t0 = time.monotonic()
    done = run_burst(setup, "--max-seconds", "3", env={**WORKER_ENV, "QKIT_REDIS_URL": url})
    assert done.returncode == 1 and time.monotonic() - t0 < 3 + 5
    assert done.stderr.count("\n") == 1 and "QKIT_REDIS_URL" in done.stderr and "sentinel-pw" not in done.stderr
    after = q.get(job_id)
    assert (after.status, after.attempts, after.updated_at) == (before.status, before.attempts, before.updated_at)


def test_f11_redis_dies_mid_burst(own_redis, tmp_path: Path):
    s = tcp_setup("f11", own_redis, tmp_path, "f11")
    q = s.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    ids = q.enqueue_many([{"type": "record", "payload": {"log": str(log), "sleep": 0.02}} for _ in range(500)])
    out = tmp_path / "worker.out"
    worker = spawn_burst(s, "--max-seconds", "20", env=WORKER_ENV, log=out)
    wait_for(lambda: len(read_log(log)) >= 20, what="the burst to be under way")
    own_redis.crash()
    t0 = time.monotonic()
    assert worker.wait(60) == 1
    # bounded by the handler in hand and the failing call, far inside max_seconds + timeout + 5
    assert time.monotonic() - t0 < 5
    lines = out.read_text().strip().splitlines()
    # one error line; at most one warning from the lease renewer, which saw it first
    # at most a warning that the Redis write is being retried, one that renewals fail, and the error
    assert len(lines) <= 3 and "QKIT_REDIS_URL" in lines[-1] and "Traceback" not in "".join(lines), lines
    with q.ledger.read_engine.connect() as conn:
        run = conn.execute(select(worker_runs).order_by(worker_runs.c.id.desc())).mappings().first()
    assert run["status"] == "failed" and run["finished_at"] is not None
    own_redis.restart()
    expire_all_leases(q)
    q.work()
    checked(q, ids, log)


# --------------------------------------------------------------------------- the ledger unavailable
def test_f12_ledger_locked_during_the_status_update(setup: Setup, tmp_path: Path):
    if setup.name == "upstash-sqlite":
        pytest.skip("the ledger side is what matters: SQLite and PostgreSQL are covered by the other two")
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    held = held_job(setup, q, tmp_path, WORKER_ENV, out=tmp_path / "worker.out")
    job_id, log, release, worker = held.job_id, held.log, held.release, held.worker
    # the renewer records its first renewal in the ledger; wait for it, so the lock only meets the settle
    wait_for(lambda: "lease_renewed" in [e for e, _ in events_of(q, job_id)], what="the first lease renewal")
    url = setup.overrides["database_url"]
    if url.startswith("sqlite"):
        locker = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        unlock = locker.rollback
    else:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        conn = engine.connect()
        conn.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        unlock = conn.rollback
    try:
        release.touch()
        wait_for(lambda: len(executions(log)) == 1, what="the handler to return")
        # 1.5 s (well past the lease) with the ledger locked: Redis must never be acknowledged first
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            inv = q.dispatch.inventory()
            assert inv.leased == 1 and inv.leases_expired == 0, inv
            time.sleep(0.05)
        assert worker.poll() is None
    finally:
        unlock()
    assert worker.wait(60) == 0
    assert q.get(job_id).status == "completed" and outcomes_of(q, job_id) == ["completed"]
    checked(q, [job_id], log)


# --------------------------------------------------------------------------- clocks and timing
SKEWED_WORKER = """
import sys, time
shift = float(sys.argv.pop(1))
real_time, real_time_ns = time.time, time.time_ns
time.time = lambda: real_time() + shift
time.time_ns = lambda: real_time_ns() + int(shift * 1e9)
from qkit.cli import main
sys.argv[0] = "qkit"
main()
"""


def skewed_burst(setup: Setup, shift: float, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SKEWED_WORKER, str(shift), "work", "--queue", setup.queue,
                             "--json", *args], env=setup.env(**WORKER_ENV), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def test_f15_a_worker_an_hour_ahead_does_not_steal_a_valid_lease(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    held = held_job(setup, q, tmp_path, WORKER_ENV)
    job_id, log, release, holder = held.job_id, held.log, held.release, held.worker
    ahead = skewed_burst(setup, +3600, log=tmp_path / "ahead.out")
    assert ahead.wait(60) == 0
    summary = json.loads((tmp_path / "ahead.out").read_text().strip().splitlines()[-1])
    assert summary["processed"] == 0 and summary["lost"] == 0
    release.touch()
    assert holder.wait(60) == 0
    assert outcomes_of(q, job_id) == ["completed"]
    checked(q, [job_id], log)


def test_f15_a_lease_taken_by_a_worker_an_hour_behind_still_expires(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    held = held_job(setup, q, tmp_path, start=lambda: skewed_burst(setup, -3600, log=tmp_path / "behind.out"))
    job_id, log, release, behind = held.job_id, held.log, held.release, held.worker
    behind.kill()
    behind.wait(10)
    t_killed = time.monotonic()
    expire_leases(q)
    assert time.monotonic() - t_killed < LEASE + 1.5  # on Redis's clock, not an hour later
    release.touch()
    assert q.work().lost == 1
    assert outcomes_of(q, job_id) == ["lost", "completed"]
    checked(q, [job_id], log)


def test_f16_a_burst_reclaims_an_expired_lease_on_its_first_claim(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=2.0, backoff_base=0)
    held = held_job(setup, q, tmp_path, {**WORKER_ENV, "QKIT_LEASE_SECONDS": 2.0})
    job_id, log, release, worker = held.job_id, held.log, held.release, held.worker
    worker.kill()
    worker.wait(10)
    release.touch()
    snap = q.dispatch.snapshot()
    deadline_ms = snap.leased[job_id][0]
    expire_leases(q)
    before = q.backend.counters()["commands"]
    summary = q.work()
    assert summary.lost == 1 and summary.completed == 1
    # no sweep: the burst's first claim took it back (inventory + claim + final settle, nothing in between)
    assert q.backend.counters()["commands"] - before <= 4
    reclaimed_at = [at for event, at in events_of(q, job_id) if event == "reclaimed"][0]
    assert reclaimed_at.timestamp() * 1000 - deadline_ms < 1000
    checked(q, [job_id], log)


# --------------------------------------------------------------------------- handlers that overrun
def test_f07_a_timed_out_handler_is_retried_and_its_child_killed(setup: Setup, tmp_path: Path):
    if setup.name == "upstash-sqlite":
        pytest.skip("worker-side behaviour: the backend does not matter")
    q = setup.connect(backoff_base=0.05)
    log, children = tmp_path / "log", tmp_path / "children"
    hung = q.enqueue("spawn_and_hang", {"log": str(log), "children": str(children)}, max_attempts=2, priority=5)
    others = q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(5)])
    for concurrency in ("1", "3"):
        if concurrency == "3":
            q.replay(hung)
        t0 = time.monotonic()
        done = run_burst(setup, "--max-seconds", "10", "--concurrency", concurrency,
                         env={**WORKER_ENV, "QKIT_BACKOFF_BASE": 0.05})
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - t0 < 10
        assert q.get(hung).status == "failed"
        assert outcomes_of(q, hung)[-2:] == ["timeout", "timeout"]
    pids = [int(x) for x in children.read_text().split()]
    assert len(pids) == 4
    for pid in pids:  # every child the hung handler started is gone with it
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert {q.get(j).status for j in others} == {"completed"}
    checked(q, [hung, *others], log)


# --------------------------------------------------------------------------- identity and logging
def test_f25_every_burst_has_its_own_worker_id(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    ids = [q.work().worker for _ in range(3)]
    ids += [json.loads(run_burst(setup, env=WORKER_ENV).stdout)["worker"] for _ in range(2)]
    assert len(set(ids)) == 5
    with q.ledger.read_engine.connect() as conn:
        assert len(set(conn.execute(select(worker_runs.c.worker).where(worker_runs.c.queue == q.name))
                       .scalars())) == 5


class _FullDisk(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise OSError(28, "No space left on device")


def test_f28_a_log_sink_that_raises_changes_nothing(setup: Setup, tmp_path: Path):
    q = setup.connect(lease_seconds=LEASE, backoff_base=0.05)
    log = tmp_path / "log"
    failing = q.enqueue("fail", {"log": str(log)}, max_attempts=2)
    fine = q.enqueue("record", {"log": str(log)})
    # make the burst log: a pending job missing from Redis is repaired, and says so
    q.dispatch.remove([fine], scope="all")
    sink, qlog = _FullDisk(), logging.getLogger("qkit")
    qlog.addHandler(sink)
    try:
        summary = q.work(max_seconds=5)
    finally:
        qlog.removeHandler(sink)
    assert summary.completed == 1 and summary.retried == 1 and summary.failed == 1
    assert outcomes_of(q, failing) == ["failed", "failed"] and q.get(fine).status == "completed"
    assert "repaired" in [e for e, _ in events_of(q, fine)]
    checked(q, [failing, fine], log)


def test_f28_logging_to_a_full_device_from_a_cli_burst(setup: Setup, tmp_path: Path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    failing = q.enqueue("fail", {"log": str(log)}, max_attempts=1)
    q.dispatch.remove([failing], scope="all")  # the burst repairs this, and logs that it did
    with open("/dev/full", "w") as full:  # every log line (stderr) fails with ENOSPC
        done = subprocess.run([sys.executable, "-m", "qkit.cli", "work", "--queue", setup.queue, "--json"],
                              env=setup.env(**WORKER_ENV), stdout=subprocess.PIPE, stderr=full, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["failed"] == 1
    assert q.get(failing).status == "failed" and [j.id for j in q.dead()] == [failing]
    checked(q, [failing])


# --------------------------------------------------------------------------- the payload boundary, from the CLI
def test_f21_payload_boundary_through_the_cli(setup: Setup, tmp_path: Path):
    """262,144 bytes of compact UTF-8 JSON are accepted, 262,145 refused (exit 2) with nothing written."""
    q = setup.connect()
    envelope = len('{"x":""}')
    fits = tmp_path / "fits.json"
    # two-byte characters: the limit counts UTF-8 bytes, not characters
    fits.write_text(json.dumps({"x": "é" * ((262_144 - envelope) // 2)}, ensure_ascii=False), encoding="utf-8")
    assert len(json.dumps(json.loads(fits.read_text()), separators=(",", ":"), ensure_ascii=False).encode()) == 262_144
    over = tmp_path / "over.json"
    over.write_text(json.dumps({"x": "é" * ((262_144 - envelope) // 2) + "a"}, ensure_ascii=False), encoding="utf-8")

    def cli(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qkit.cli", "enqueue", "web_scraping", "--queue", setup.queue,
                               "--payload", f"@{path}"], env=setup.env(), capture_output=True, text=True, timeout=60)

    accepted = cli(fits)
    assert accepted.returncode == 0, accepted.stderr
    before_rows, before_inv = len(q.jobs()), q.dispatch.inventory()
    refused = cli(over)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "262145 bytes" in refused.stderr and "262144" in refused.stderr
    after_inv = q.dispatch.inventory()
    assert len(q.jobs()) == before_rows == 1
    assert (after_inv.ready, after_inv.delayed, after_inv.leased) == (before_inv.ready, before_inv.delayed,
                                                                      before_inv.leased)


# --------------------------------------------------------------------------- the checker itself
def test_the_total_queue_check_flags_each_kind_of_fault(setup: Setup, tmp_path: Path):
    """The checker the scenarios rely on: each count moves when, and only when, it should."""
    q = setup.connect(lease_seconds=LEASE, backoff_base=0)
    log = tmp_path / "log"
    done_id = q.enqueue("record", {"log": str(log)})
    never_run = q.enqueue("record", {"log": str(log)}, delay=3600)
    q.work()
    runs = executions(log)
    assert runs == [(done_id, 1)]
    clean = total_queue(q, [done_id], runs)
    assert clean.valid and clean.to_dict()["lost"] == 0

    lost = total_queue(q, [done_id, never_run], runs)  # acknowledged, still pending
    assert lost.lost == [never_run] and not lost.valid
    ghost = total_queue(q, [done_id], [*runs, (never_run + 999, 1)])  # a run of an id with no row
    assert ghost.unexpected == [never_run + 999] and not ghost.valid
    twice = total_queue(q, [done_id], [*runs, (done_id, 1)])  # the completed attempt ran twice
    assert twice.duplicated == [done_id] and twice.unexplained == [(done_id, 0, 1)] and not twice.valid
    phantom = total_queue(q, [done_id], [*runs, (done_id, 2)])  # an attempt the ledger never saw
    assert phantom.unexplained == [(done_id, 0, 2)] and not phantom.valid
    recovered = total_queue(q, [], runs, attempted=[done_id])  # enqueue unanswered, job ended anyway
    assert recovered.recovered == [done_id] and recovered.valid
    assert "lost 0" in recovered.summary() and "recovered 1" in recovered.summary()

    # a handler returned, but its worker never recorded it: the job ends failed (its one attempt lost)
    stalled = q.enqueue("record", {"log": str(log)}, max_attempts=1)
    claim = q.dispatch.claim("w-stalled", 1000, 1)
    q.ledger.claim(q.name, "w-stalled", claim.claimed, claim.reclaimed, q.backoff)
    expire_leases(q)
    q.work()
    assert q.get(stalled).status == "failed"
    wasted = total_queue(q, [done_id, stalled], [*runs, (stalled, 1)])
    assert wasted.wasted_success == [stalled] and not wasted.valid and "wasted-success 1" in wasted.summary()
    died = total_queue(q, [done_id, stalled], [*runs, (stalled, 1)], deaths_expected=True)  # the lost attempt
    assert died.wasted_success == [] and died.valid

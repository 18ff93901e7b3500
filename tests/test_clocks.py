"""Clocks and junk bookkeeping (issue 12 items 5 and 6), on every backend.

Item 5: due times come from one clock, Redis ``TIME``, whoever writes them: an
enqueuer or a worker whose clock is an hour off (``time.time`` shifted in its
process, as in tests/test_faults.py's F15) neither delays a job by an hour nor
makes it due early, in Redis or in the ledger's ``run_at`` (which a rebuild of
Redis from the ledger trusts).

Item 6: junk written into a queue's bookkeeping keys (the aging clock, the
delayed-priority hash) neither wedges the queue nor ends FIFO order.
"""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import qkit
from conftest import Setup
from job_handlers import read_log
from test_faults import SKEWED_WORKER

#: a qkit command on a host whose clock is off: time.time (test_faults' F15 runner) and datetime.now
SKEWED = SKEWED_WORKER.replace("from qkit.cli import main", """
import datetime as _dt
_real = _dt.datetime
class _AnyDatetime(type):
    def __instancecheck__(cls, obj):  # a datetime psycopg built is a datetime here too
        return isinstance(obj, _real)
class _HostDatetime(_dt.datetime, metaclass=_AnyDatetime):
    __slots__ = ()  # the size of datetime itself: C extensions (psycopg) check it
    @classmethod
    def now(cls, tz=None):
        return cls.fromtimestamp(time.time(), tz)
    @classmethod
    def utcnow(cls):
        return cls.fromtimestamp(time.time(), _dt.timezone.utc).replace(tzinfo=None)
_dt.datetime = _HostDatetime
from qkit.cli import main""").replace("\nmain()", "\nsys.exit(main())")
assert SKEWED.endswith("sys.exit(main())\n")

HOUR = 3600.0
WORKER_ENV = {"QKIT_HANDLERS": "job_handlers", "QKIT_LEASE_SECONDS": 5}


def skewed(setup: Setup, shift: float, *args: str, **env: object) -> subprocess.CompletedProcess:
    """A ``qkit`` command in a process whose wall clock is ``shift`` seconds off."""
    out = subprocess.run([sys.executable, "-c", SKEWED, str(shift), *args], env=setup.env(**env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def redis_now(q: qkit.Queue) -> datetime:
    return datetime.fromtimestamp(q.dispatch.inventory().now_ms / 1000, timezone.utc)


def lose_redis_and_rebuild(q: qkit.Queue, keep: tuple[str, ...] = ()) -> None:
    """Redis forgets the queue (but ``keep``); ``audit --repair`` rebuilds it from the ledger's run_at."""
    from qkit.ops.audit import audit

    q.backend.pipeline([["DEL", *[k for k in q.dispatch.keys if k not in keep]]])
    audit(q, repair=True)


# --------------------------------------------------------------------------- item 5: enqueuer's clock
@pytest.mark.parametrize("shift", [+HOUR, -HOUR])
def test_an_enqueuer_with_a_skewed_clock_makes_a_job_due_now(setup: Setup, tmp_path: Path, shift: float):
    q = setup.connect(backoff_base=0)
    log = tmp_path / "log"
    out = skewed(setup, shift, "enqueue", "record", "--queue", setup.queue, "--payload",
                 json.dumps({"log": str(log)}), "--json")
    job_id = json.loads(out.stdout)["id"]
    job = q.get(job_id)
    assert abs(job.run_at - redis_now(q)) < timedelta(seconds=5), (job.run_at, shift)
    import job_handlers  # noqa: F401 - registers "record" in this process

    summary = q.work(max_seconds=20)
    assert summary.completed == 1, summary
    assert [what for what, *_ in read_log(log)] == ["start", "done"]


@pytest.mark.parametrize("shift", [+HOUR, -HOUR])
def test_an_enqueuers_delay_is_kept_on_redis_clock_through_a_rebuild(setup: Setup, shift: float):
    q = setup.connect(backoff_base=0)
    out = skewed(setup, shift, "enqueue", "record", "--queue", setup.queue, "--delay", "60", "--json")
    job_id = json.loads(out.stdout)["id"]
    due = q.get(job_id).run_at
    assert abs(due - (redis_now(q) + timedelta(seconds=60))) < timedelta(seconds=5), (due, shift)
    lose_redis_and_rebuild(q)
    snap = q.dispatch.snapshot()
    assert job_id in snap.delayed, snap  # neither ready an hour early nor delayed an hour late
    assert 50_000 < snap.delayed[job_id] - snap.now_ms <= 61_000


def test_python_enqueue_after_a_clock_step_keeps_redis_time(setup: Setup, monkeypatch: pytest.MonkeyPatch):
    """A process whose clock is stepped an hour ahead after its first reply keeps writing Redis's time."""
    import time

    q = setup.connect(backoff_base=0)
    q.enqueue("record", {})  # the first reply: the process now knows Redis's clock
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + HOUR)
    job_id = q.enqueue("record", {}, delay=30)
    assert abs(q.get(job_id).run_at - (redis_now(q) + timedelta(seconds=30))) < timedelta(seconds=5)


# --------------------------------------------------------------------------- item 5: worker's clock
@pytest.mark.parametrize("shift", [+HOUR, -HOUR])
def test_a_retry_scheduled_by_a_skewed_worker_is_due_on_redis_clock(setup: Setup, tmp_path: Path, shift: float):
    q = setup.connect(backoff_base=0)
    log = tmp_path / "log"
    job_id = q.enqueue("fail", {"log": str(log)}, max_attempts=3)
    # back-off base 40 s: the retry is due 0..40 s after the failure, on Redis's clock
    out = skewed(setup, shift, "work", "--queue", setup.queue, "--max-jobs", "1", "--json",
           **WORKER_ENV, QKIT_BACKOFF_BASE=40, QKIT_BACKOFF_MAX=40)
    job = q.get(job_id)
    assert job.status == "pending" and job.attempts == 1, (job, out.stderr[-2000:])
    now = redis_now(q)
    snap = q.dispatch.snapshot()
    assert job_id in snap.delayed or job_id in snap.ready, snap
    redis_due = datetime.fromtimestamp(snap.delayed.get(job_id, snap.now_ms) / 1000, timezone.utc)
    # the ledger agrees with Redis on when the retry is due (neither an hour late nor early)
    assert abs(job.run_at - redis_due) < timedelta(seconds=3), (job.run_at, redis_due, shift)
    assert now - timedelta(seconds=5) < job.run_at < now + timedelta(seconds=41)
    # and a rebuild from the ledger keeps that due time
    lose_redis_and_rebuild(q)
    snap = q.dispatch.snapshot()
    rebuilt_due = snap.delayed.get(job_id, snap.now_ms)
    assert abs(rebuilt_due - redis_due.timestamp() * 1000) < 3000, (rebuilt_due, redis_due)


def test_a_retry_from_a_fast_worker_runs_when_due_not_an_hour_later(setup: Setup, tmp_path: Path):
    q = setup.connect(backoff_base=0)
    log = tmp_path / "log"
    job_id = q.enqueue("fail", {"log": str(log)}, max_attempts=2)
    skewed(setup, +HOUR, "work", "--queue", setup.queue, "--max-jobs", "1", "--json",
           **WORKER_ENV, QKIT_BACKOFF_BASE=1, QKIT_BACKOFF_MAX=1)
    assert q.get(job_id).attempts == 1
    import job_handlers  # noqa: F401 - registers "fail" in this process

    q.work(max_seconds=15)  # waits for the retry (due within 1 s on Redis's clock)
    job = q.get(job_id)
    assert job.attempts == 2 and job.status == "failed", job
    assert [(what, attempt) for what, _, attempt, _ in read_log(log)] == [("start", 1), ("start", 2)]


# --------------------------------------------------------------------------- item 6: junk bookkeeping
JUNK = {
    "text": ("SET", "abc"),
    "huge": ("SET", "1e30"),
    "negative": ("SET", "-5"),
    "nan": ("SET", "nan"),
    "inf": ("SET", "inf"),
    "ahead_a_year": ("SET", "YEAR"),
    "a_list": ("RPUSH", "x"),
    "a_hash": ("HSET", "f", "v"),
}


def _write_junk(q: qkit.Queue, key: str, how: tuple[str, ...]) -> None:
    q.backend.pipeline([["DEL", key]])
    if how == ("SET", "YEAR"):
        how = ("SET", str((q.dispatch.inventory().now_ms + 365 * 86400_000) * 1000))
    q.backend.pipeline([[how[0], key, *how[1:]]])


def _fifo_holds(setup: Setup, q: qkit.Queue, tmp_path: Path) -> None:
    """Enqueue one by one (each a script call), then run: they must run in enqueue order."""
    import job_handlers  # noqa: F401

    log = tmp_path / "fifo.log"
    ids = [q.enqueue("record", {"log": str(log)}) for _ in range(12)]
    ids += q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(12)])
    summary = q.work(max_jobs=len(ids))
    assert summary.completed == len(ids), summary
    order = [job_id for what, job_id, *_ in read_log(log) if what == "start"]
    assert order == ids


@pytest.mark.parametrize("junk", sorted(JUNK))
def test_junk_in_the_clock_key_neither_wedges_nor_ends_fifo(setup: Setup, tmp_path: Path, junk: str):
    q = setup.connect(backoff_base=0, priority_aging=30)
    clock_key = q.dispatch.keys[6]
    _write_junk(q, clock_key, JUNK[junk])
    job_id = q.enqueue("record", {"log": str(tmp_path / "log")})  # enqueue: push.lua reads the clock
    assert q.get(job_id).status == "pending"
    assert q.dispatch.snapshot().place_of(job_id) == "ready"
    _write_junk(q, clock_key, JUNK[junk])
    import job_handlers  # noqa: F401

    assert q.work(max_jobs=1).completed == 1  # a burst: claim.lua reads it too
    _write_junk(q, clock_key, JUNK[junk])
    other = q.enqueue("record", {"log": str(tmp_path / "log")})
    lose_redis_and_rebuild(q, keep=(clock_key,))  # audit --repair pushes through the same path
    assert q.dispatch.snapshot().place_of(other) == "ready"
    assert q.work(max_jobs=1).completed == 1
    _write_junk(q, clock_key, JUNK[junk])
    _fifo_holds(setup, q, tmp_path)
    (value,) = q.backend.pipeline([["GET", clock_key]])
    assert abs(int(value) / 1000 - q.dispatch.inventory().now_ms) < 60_000  # repaired: near Redis TIME


@pytest.mark.parametrize("junk", ["a_string", "a_list"])
def test_the_delayed_priority_hash_made_another_type_does_not_wedge(setup: Setup, tmp_path: Path, junk: str):
    q = setup.connect(backoff_base=0, priority_aging=30)
    prio_key = q.dispatch.keys[5]
    q.backend.pipeline([["SET", prio_key, "junk"]] if junk == "a_string" else [["RPUSH", prio_key, "junk"]])
    delayed = q.enqueue("record", {"log": str(tmp_path / "log")}, delay=0.2, priority=5)  # push.lua writes the hash
    q.backend.pipeline([["DEL", prio_key], ["SET", prio_key, "junk"]])
    import time

    time.sleep(0.3)
    assert q.work(max_jobs=1).completed == 1  # claim.lua reads it for the due job
    assert q.get(delayed).status == "completed"
    q.backend.pipeline([["SET", prio_key, "junk"]])
    q.dispatch.remove([delayed], scope="all")  # remove.lua deletes from it
    _fifo_holds(setup, q, tmp_path)

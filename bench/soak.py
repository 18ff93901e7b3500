"""F29, the nemesis soak: jobs through killed workers, a restarting Redis and a locked ledger.

``python bench/soak.py [--seeds 20] [--seed-start 0] [--jobs 500] [--workers 4] [--fail-rate 0.3]
[--ledger sqlite|postgres] [--json]``

Per seed, on fresh servers (a redis-server with AOF on, a SQLite file or a
fresh PostgreSQL database):

1. an enqueuer process enqueues ``--jobs`` jobs of ``bench/soak_handlers.py``
   (one idempotency key each, retried with the same key after an error)
   during the first seconds, while ``--workers`` burst worker processes
   (``qkit work``, respawned whenever one ends) run them;
2. meanwhile the nemesis SIGKILLs a random worker every 0.5-3 s (uniform,
   seeded), restarts Redis twice (kill -9, then the same port and data dir)
   and locks the ledger once for 5 s (SQLite: another process in ``BEGIN
   EXCLUSIVE``; PostgreSQL: ``LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE``);
3. the nemesis stops and the workers drain the queue with no faults: until
   every job in the ledger is terminal and Redis holds no ready, delayed or
   leased entry (bounded by ``--drain-timeout``);
4. :func:`qkit.audit.total_queue` checks it Jepsen-style: the ids the
   enqueuer got back (acknowledged), the ids found by key for calls that
   errored (attempted), and the handler's ``done`` lines (executions).

A seed is valid iff the report is (lost = unexpected = unexplained = 0, audit
clean).  Prints a line per seed and totals (or one JSON document with
``--json``); exits 1 if any seed is invalid.  Every server and process it
starts is stopped on the way out, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from qkit.devservers import RedisServer, start_redis  # noqa: E402 - after the path set-up

QUEUE = "soak"
LEASE_SECONDS = 1.0
BACKOFF_BASE = 0.1
DB_LOCK_SECONDS = 5.0
KILL_INTERVAL = (0.5, 3.0)
REDIS_RESTARTS = 2


# ============================================================================ servers
def start_restartable_redis(folder: Path) -> RedisServer:
    """A redis-server with AOF on (fsynced every second, like the embedded one), restartable with
    :meth:`RedisServer.restart` on the same port and data directory."""
    return start_redis(folder, extra_args=["--appendonly", "yes", "--appendfsync", "everysec",
                                           "--maxmemory-policy", "noeviction"], timeout=20.0)


# ============================================================================ workers
@dataclass
class WorkerExit:
    pid: int
    code: int
    killed: bool  # by the nemesis
    summary: dict[str, Any] | None


class WorkerPool:
    """``n`` burst worker processes (``qkit work``); a slot whose process ended gets a new one."""

    def __init__(self, n: int, env: dict[str, str], logdir: Path, max_seconds: float) -> None:
        self.n = n
        self.env = env
        self.logdir = logdir
        self.max_seconds = max_seconds
        self.slots: list[subprocess.Popen | None] = [None] * n
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.exits: list[WorkerExit] = []
        self.killed: dict[int, float] = {}  # pid -> when the nemesis killed it
        self.spawned = 0
        self._outputs: dict[int, Path] = {}
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="soak-workers")

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen:
        self.spawned += 1
        out = self.logdir / f"w{self.spawned:04d}.out"
        err = open(self.logdir / f"w{self.spawned:04d}.err", "w")
        with open(out, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "qkit.cli", "work", "--queue", QUEUE, "--json",
                                     "--max-seconds", str(self.max_seconds)],
                                    env=self.env, stdout=fh, stderr=err, cwd=str(self.logdir))
        err.close()
        self._outputs[proc.pid] = out
        return proc

    def _reap(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        summary = None
        try:
            lines = self._outputs.pop(proc.pid).read_text().strip().splitlines()
            summary = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError, KeyError):
            pass
        self.exits.append(WorkerExit(proc.pid, code, proc.pid in self.killed, summary))

    def _supervise(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                for i, proc in enumerate(self.slots):
                    if proc is not None and proc.poll() is None:
                        continue
                    if proc is not None:
                        self._reap(proc)
                    self.slots[i] = None if self.stopping.is_set() else self._spawn()
            # a respawn rate limit, not a synchronisation: a burst that found nothing to do
            # ends at once, and four of them restarting in a tight loop would starve the others
            self.stopping.wait(0.1)

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.slots if p is not None and p.poll() is None]

    def kill_random(self, rng: random.Random) -> int | None:
        """SIGKILL one live worker chosen by ``rng``; returns its pid (None if none was alive)."""
        with self.lock:
            alive = self.alive()
            if not alive:
                return None
            victim = rng.choice(alive)
            victim.send_signal(signal.SIGKILL)
            self.killed[victim.pid] = time.monotonic()
            return victim.pid

    def stop(self, grace: float = 30.0) -> None:
        """Stop respawning; SIGTERM the live workers (each finishes its job in hand) and reap them."""
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with self.lock:
            for proc in self.slots:
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for i, proc in enumerate(self.slots):
                if proc is None:
                    continue
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                self._reap(proc)
                self.slots[i] = None

    def kill_all(self) -> None:
        """Last-resort cleanup (an exception or Ctrl-C): kill whatever still runs."""
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(10)  # no respawn after this
        with self.lock:
            for proc in self.slots:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(10)


# ============================================================================ the DB lock
LOCK_SQLITE = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=120, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
t0 = time.monotonic()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", round(time.monotonic() - t0, 3), flush=True)
"""

LOCK_POSTGRES = """
import psycopg, sys, time
conn = psycopg.connect(sys.argv[1])
conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
t0 = time.monotonic()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.commit()
print("released", round(time.monotonic() - t0, 3), flush=True)
"""


class DbLock:
    """Another process holding the ledger locked for ``seconds``; ``held`` is what it measured."""

    def __init__(self, database_url: str, seconds: float) -> None:
        from sqlalchemy.engine import make_url

        url = make_url(database_url)
        if url.get_backend_name() == "sqlite":
            script, target = LOCK_SQLITE, str(url.database)
        else:
            script, target = LOCK_POSTGRES, url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.process = subprocess.Popen([sys.executable, "-c", script, target, str(seconds)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.locked = threading.Event()
        self.held: float | None = None
        self.error = ""
        self._thread = threading.Thread(target=self._read, daemon=True, name="soak-dblock")
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("locked"):
                self.locked.set()
            elif line.startswith("released"):
                self.held = float(line.split()[1])
        self.process.wait()
        if self.process.returncode:
            self.error = (self.process.stderr.read() if self.process.stderr else "").strip()[-500:]

    def wait(self, timeout: float = 120) -> None:
        self._thread.join(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# ============================================================================ the nemesis
@dataclass
class NemesisLog:
    kills: list[tuple[float, int]] = field(default_factory=list)  # (t, pid)
    kill_misses: int = 0  # ticks that found no live worker
    redis_restarts: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds down)
    db_locks: list[DbLock] = field(default_factory=list)
    db_lock_at: list[float] = field(default_factory=list)


def nemesis_plan(rng: random.Random, window: float) -> list[tuple[float, str]]:
    """The seeded schedule: (seconds from the start, what) in time order."""
    events: list[tuple[float, str]] = []
    t = 0.0
    while True:
        t += rng.uniform(*KILL_INTERVAL)
        if t >= window:
            break
        events.append((t, "kill"))
    half = window / 2
    events.append((rng.uniform(0.5, half - 0.5), "redis"))
    events.append((rng.uniform(half, window - 0.5), "redis"))
    events.append((rng.uniform(1.0, max(1.5, window - DB_LOCK_SECONDS - 0.5)), "dblock"))
    return sorted(events)


class Nemesis(threading.Thread):
    def __init__(self, plan: list[tuple[float, str]], rng: random.Random, pool: WorkerPool,
                 redis_server: RedisServer, database_url: str, t0: float) -> None:
        super().__init__(daemon=True, name="soak-nemesis")
        self.plan, self.rng, self.pool, self.redis = plan, rng, pool, redis_server
        self.database_url, self.t0 = database_url, t0
        self.log = NemesisLog()
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for at, what in self.plan:
                if self.halt.wait(max(0.0, self.t0 + at - time.monotonic())):
                    return
                now = time.monotonic() - self.t0
                if what == "kill":
                    pid = self.pool.kill_random(self.rng)
                    if pid is None:
                        self.log.kill_misses += 1
                    else:
                        self.log.kills.append((now, pid))
                elif what == "redis":
                    t = time.monotonic()
                    self.redis.restart()
                    self.log.redis_restarts.append((now, time.monotonic() - t))
                elif what == "dblock":
                    self.log.db_locks.append(DbLock(self.database_url, DB_LOCK_SECONDS))
                    self.log.db_lock_at.append(now)
        except BaseException as exc:  # noqa: BLE001 - reported by the seed
            self.error = exc


# ============================================================================ one seed
@dataclass
class SeedResult:
    seed: int
    valid: bool
    acknowledged: int
    lost: int
    unexpected: int
    duplicated: int
    explained: int
    unexplained: int
    recovered: int
    attempted_only: int  # keys whose enqueue never returned an id (found in the ledger by key)
    kills: int
    kills_mid_run: int  # killed workers that held an open attempt (recorded lost by the ledger)
    lost_by: dict[str, int]  # lost attempts by how their worker ended: killed, live, exit N
    lost_not_started: int  # lost attempts whose handler never began (batch-mates of the job in hand)
    redis_restarts: int
    redis_down_s: float
    db_locks: int
    db_lock_held_s: float
    attempts: dict[str, int]
    statuses: dict[str, int]
    executions: int
    enqueue_errors: int
    worker_runs: int
    worker_exits: dict[str, int]
    nemesis_s: float
    drain_s: float
    drained: bool
    wall_s: float
    audit_counts: dict[str, int]
    problems: list[str]
    report: dict[str, Any]

    def _lost_by(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.lost_by.items())) or "-"

    def line(self) -> str:
        att = " ".join(f"{k} {v}" for k, v in sorted(self.attempts.items()))
        return (f"seed {self.seed:>3}: {'VALID  ' if self.valid else 'INVALID'} {self.acknowledged} acked · "
                f"lost {self.lost} · unexpected {self.unexpected} · duplicated {self.duplicated} "
                f"({self.explained} explained / {self.unexplained} unexplained) · recovered {self.recovered} · "
                f"kills {self.kills} ({self.kills_mid_run} mid-run) · lost attempts by {self._lost_by()} "
                f"({self.lost_not_started} never started) · redis restarts {self.redis_restarts} · "
                f"db lock {self.db_lock_held_s:.1f} s · attempts: {att} · {self.wall_s:.1f} s"
                + (f" · audit {self.audit_counts}" if self.audit_counts else "")
                + (f" · PROBLEMS: {'; '.join(self.problems)}" if self.problems else ""))


def _worker_env(redis_url: str, database_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QKIT_", "UPSTASH_"))}
    env.update({
        "QKIT_REDIS_URL": redis_url, "QKIT_DATABASE_URL": database_url, "QKIT_HOME": str(home),
        "QKIT_HANDLERS": "soak_handlers", "QKIT_LEASE_SECONDS": str(LEASE_SECONDS),
        "QKIT_BACKOFF_BASE": str(BACKOFF_BASE), "QKIT_BACKOFF_MAX": "2",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")]),
    })
    return env


def _wait(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``check`` (an exception counts as not yet) until true or ``timeout``; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - e.g. Redis restarting
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


_PID = re.compile(r"-(\d+)-[0-9a-f]{8}$")


def run_seed(seed: int, *, jobs: int = 500, workers: int = 4, fail_rate: float = 0.3, max_attempts: int = 3,
             database_url: str | None = None, workdir: Path | None = None, window: float = 15.0,
             enqueue_seconds: float = 6.0, burst_seconds: float = 4.0, drain_timeout: float = 90.0,
             status: Callable[[str], None] = lambda s: None, keep: bool = False) -> SeedResult:
    """One soak run (see the module docstring); servers and processes are stopped before it returns."""
    import qkit
    from qkit.audit import total_queue
    from sqlalchemy import func, select

    from qkit.ledger import job_attempts, jobs as jobs_table
    from soak_handlers import read_log

    t_start = time.monotonic()
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"qkit-soak-{seed}-"))
    base.mkdir(parents=True, exist_ok=True)
    (base / "workers").mkdir(exist_ok=True)
    log = base / "handler.log"
    database_url = database_url or f"sqlite:///{base / 'ledger.sqlite3'}"
    rng = random.Random(seed)
    problems: list[str] = []
    redis_server: RedisServer | None = None
    pool: WorkerPool | None = None
    nemesis: Nemesis | None = None
    enqueuer: subprocess.Popen | None = None
    q = None
    try:
        status("start redis")
        redis_server = start_restartable_redis(base)
        q = qkit.connect(QUEUE, redis_url=redis_server.url, database_url=database_url, home=base,
                         lease_seconds=LEASE_SECONDS, backoff_base=BACKOFF_BASE)  # creates the tables
        env = _worker_env(redis_server.url, database_url, base)
        acks = base / "enqueue.jsonl"
        with open(base / "enqueuer.err", "w") as err:
            enqueuer = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "_enqueue", "--seed", str(seed), "--jobs", str(jobs),
                 "--fail-rate", str(fail_rate), "--max-attempts", str(max_attempts), "--log", str(log),
                 "--out", str(acks), "--seconds", str(enqueue_seconds)],
                env=env, stdout=subprocess.DEVNULL, stderr=err)
        pool = WorkerPool(workers, env, base / "workers", burst_seconds)
        t0 = time.monotonic()
        pool.start()
        nemesis = Nemesis(nemesis_plan(rng, window), rng, pool, redis_server, database_url, t0)
        status("nemesis")
        nemesis.start()
        nemesis.join()
        for lock in nemesis.log.db_locks:
            lock.wait()
        nemesis_s = time.monotonic() - t0
        if nemesis.error is not None:
            problems.append(f"nemesis failed: {type(nemesis.error).__name__}: {nemesis.error}")
        status("enqueue")
        try:
            enqueuer.wait(120)
        except subprocess.TimeoutExpired:
            enqueuer.kill()
            enqueuer.wait()
            problems.append("enqueuer did not finish in 120 s")
        if enqueuer.returncode:
            problems.append(f"enqueuer exited {enqueuer.returncode}")
        acked: dict[int, int] = {}
        errored: set[int] = set()
        enqueue_errors = 0
        for line in acks.read_text().splitlines() if acks.exists() else []:
            try:
                rec = json.loads(line)
            except ValueError:  # a torn last line: the enqueuer was killed mid-write
                continue
            if "id" in rec:
                acked[rec["i"]] = rec["id"]
            else:
                errored.add(rec["i"])
                enqueue_errors += 1
        # keys whose every call errored: the job may still have landed (ledger committed, answer lost)
        never = sorted(set(range(jobs)) - set(acked))
        keys = [f"soak-{seed}-{i}" for i in never]
        attempted: list[int] = []
        if keys:
            with q.ledger.read_engine.connect() as conn:
                attempted = [int(r[0]) for r in conn.execute(select(jobs_table.c.id).where(
                    jobs_table.c.queue == QUEUE, jobs_table.c.idempotency_key.in_(keys)))]
        attempted += [acked[i] for i in errored if i in acked]

        # drain: no more faults; the workers run until the ledger has nothing active and Redis nothing queued
        status("drain")
        t_drain = time.monotonic()

        def drained() -> bool:
            counts = q.ledger.status_counts(QUEUE)
            if counts["pending"] or counts["processing"]:
                return False
            inv = q.dispatch.inventory()
            return inv.ready + inv.delayed + inv.leased == 0

        is_drained = _wait(drained, drain_timeout, 0.1)
        drain_s = time.monotonic() - t_drain
        if not is_drained:
            problems.append(f"not drained after {drain_timeout:.0f} s")
        status("audit")
        pool.stop()

        rows = read_log(log)
        executions = [(j, a) for what, j, a, _ in rows if what == "done"]
        report = total_queue(q, acked.values(), executions, attempted=attempted)
        with q.ledger.read_engine.connect() as conn:
            outcome_rows = conn.execute(
                select(job_attempts.c.outcome, func.count()).select_from(
                    job_attempts.join(jobs_table, jobs_table.c.id == job_attempts.c.job_id))
                .where(jobs_table.c.queue == QUEUE).group_by(job_attempts.c.outcome)).all()
            lost_rows = conn.execute(
                select(job_attempts.c.worker, job_attempts.c.job_id, job_attempts.c.attempt).select_from(
                    job_attempts.join(jobs_table, jobs_table.c.id == job_attempts.c.job_id))
                .where(jobs_table.c.queue == QUEUE, job_attempts.c.outcome == "lost")).all()
        lost_workers = [r[0] for r in lost_rows]
        started = {(j, a) for what, j, a, _ in rows if what == "start"}
        # claimed in a batch, charged a lost attempt when the worker died, but its handler never began
        lost_not_started = sum(1 for _, j, a in lost_rows if (j, a) not in started)
        lost_pids = {int(m.group(1)) for w in lost_workers if (m := _PID.search(w))}
        killed_pids = {pid for _, pid in nemesis.log.kills}
        # whose lost attempts: a killed worker's, a worker that ended on an error (e.g. Redis gone)
        # or a live worker's ("live": its lease expired while it ran, which renewal must prevent)
        exit_of = {e.pid: e for e in pool.exits}
        lost_by: Counter[str] = Counter()
        for w in lost_workers:
            m = _PID.search(w)
            e = exit_of.get(int(m.group(1))) if m else None
            lost_by["unknown" if e is None else "killed" if e.killed else "live" if e.code == 0
                    else f"exit {e.code}"] += 1
        exits = Counter("killed" if e.killed else ("ok" if e.code == 0 else f"exit {e.code}") for e in pool.exits)
        for lock in nemesis.log.db_locks:
            if lock.error:
                problems.append(f"db lock failed: {lock.error}")
        dup_unexplained = {j for j, _, _ in report.unexplained}
        counts = q.ledger.status_counts(QUEUE)
        return SeedResult(
            seed=seed, valid=report.valid, acknowledged=report.acknowledged, lost=len(report.lost),
            unexpected=len(report.unexpected), duplicated=len(report.duplicated),
            explained=len([j for j in report.duplicated if j not in dup_unexplained]),
            unexplained=len(report.unexplained), recovered=len(report.recovered), attempted_only=len(never),
            kills=len(nemesis.log.kills), kills_mid_run=len(killed_pids & lost_pids), lost_by=dict(lost_by),
            lost_not_started=lost_not_started,
            redis_restarts=len(nemesis.log.redis_restarts),
            redis_down_s=round(sum(d for _, d in nemesis.log.redis_restarts), 3),
            db_locks=sum(1 for lock in nemesis.log.db_locks if lock.held is not None),
            db_lock_held_s=round(sum(lock.held or 0 for lock in nemesis.log.db_locks), 3),
            attempts={(k or "open"): int(n) for k, n in outcome_rows},
            statuses={k: counts[k] for k in ("pending", "processing", "completed", "failed")},
            executions=len(executions), enqueue_errors=enqueue_errors, worker_runs=pool.spawned,
            worker_exits=dict(exits), nemesis_s=round(nemesis_s, 3), drain_s=round(drain_s, 3), drained=is_drained,
            wall_s=round(time.monotonic() - t_start, 3), audit_counts=report.audit.counts, problems=problems,
            report={**report.to_dict(), "audit_summary": report.audit.summary(),
                    "nemesis": {"kills": nemesis.log.kills, "kill_misses": nemesis.log.kill_misses,
                                "redis_restarts": nemesis.log.redis_restarts, "db_lock_at": nemesis.log.db_lock_at},
                    "workdir": str(base)})
    finally:
        if nemesis is not None:
            nemesis.halt.set()
            nemesis.join(30)
            for lock in nemesis.log.db_locks:
                lock.kill()
        if pool is not None:
            pool.kill_all()
        if enqueuer is not None and enqueuer.poll() is None:
            enqueuer.kill()
            enqueuer.wait(10)
        if q is not None:
            q.close()
        if redis_server is not None:
            redis_server.stop()
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)


# ============================================================================ the enqueuer process
def enqueuer_main(argv: list[str]) -> int:
    """``soak.py _enqueue``: enqueue the jobs, each under its key, retrying errors with the same key.

    Writes one JSON line per call: ``{"i", "id"}`` when it returned, ``{"i", "error"}`` when it raised.
    """
    ap = argparse.ArgumentParser(prog="soak.py _enqueue")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--jobs", type=int, required=True)
    ap.add_argument("--fail-rate", type=float, required=True)
    ap.add_argument("--max-attempts", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--give-up", type=float, default=60.0)
    args = ap.parse_args(argv)
    import qkit

    q = qkit.connect(QUEUE)
    t0 = time.monotonic()
    with open(args.out, "a") as out:
        for i in range(args.jobs):
            # spread over --seconds: the enqueue runs while the nemesis does
            ahead = t0 + args.seconds * i / args.jobs - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            payload = {"log": args.log, "seed": args.seed, "fail_rate": args.fail_rate, "i": i}
            give_up = time.monotonic() + args.give_up
            while True:
                try:
                    job_id = q.enqueue("soak", payload, key=f"soak-{args.seed}-{i}", max_attempts=args.max_attempts)
                except Exception as exc:  # noqa: BLE001 - retried with the same key
                    out.write(json.dumps({"i": i, "error": f"{type(exc).__name__}: {exc}"[:300]}) + "\n")
                    out.flush()
                    if time.monotonic() > give_up:
                        break
                    time.sleep(0.02)
                    continue
                out.write(json.dumps({"i": i, "id": job_id}) + "\n")
                out.flush()
                break
    q.close()
    return 0


# ============================================================================ many seeds
TOTAL_KEYS = ("acknowledged", "lost", "unexpected", "duplicated", "explained", "unexplained", "recovered",
              "attempted_only", "kills", "kills_mid_run", "lost_not_started", "redis_restarts", "db_locks", "executions",
              "enqueue_errors", "worker_runs")


def totals(results: list[SeedResult]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(getattr(r, k) for r in results) for k in TOTAL_KEYS}
    attempts: Counter[str] = Counter()
    lost_by: Counter[str] = Counter()
    for r in results:
        attempts.update(r.attempts)
        lost_by.update(r.lost_by)
    out.update(seeds=len(results), valid=sum(r.valid for r in results),
               invalid=[r.seed for r in results if not r.valid],
               db_lock_held_s=round(sum(r.db_lock_held_s for r in results), 3),
               redis_down_s=round(sum(r.redis_down_s for r in results), 3),
               attempts=dict(sorted(attempts.items())), lost_by=dict(sorted(lost_by.items())),
               wall_s=round(sum(r.wall_s for r in results), 3),
               wall_s_max=max((r.wall_s for r in results), default=0.0))
    return out


def run_soak(seeds: list[int], *, ledger: str = "sqlite", progress: bool = True,
             on_result: Callable[[SeedResult], None] | None = None, **kwargs: Any) -> list[SeedResult]:
    """Run the soak for each seed (a PostgreSQL is started once for all seeds with ``ledger='postgres'``)."""
    from tqdm import tqdm

    results: list[SeedResult] = []
    pg = None
    pg_dir = None
    try:
        if ledger == "postgres":
            from qkit.devservers import start_postgres

            pg_dir = Path(tempfile.mkdtemp(prefix="qkit-soak-pg-"))
            pg = start_postgres(pg_dir)
        with tqdm(total=len(seeds), unit="seed", desc="soak", file=sys.stderr, disable=not progress) as bar:
            for seed in seeds:
                def status(phase: str, seed: int = seed) -> None:
                    bar.set_postfix_str(f"seed {seed}: {phase}")

                url = pg.database(f"soak_{seed}") if pg is not None else None
                result = run_seed(seed, database_url=url, status=status, **kwargs)
                results.append(result)
                if on_result is not None:
                    on_result(result)
                bar.update(1)
    finally:
        if pg is not None:
            pg.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_enqueue"]:
        return enqueuer_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds (default 1)")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--fail-rate", type=float, default=0.3)
    ap.add_argument("--max-attempts", type=int, default=3)
    ap.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--window", type=float, default=15.0, help="seconds the nemesis runs (default 15)")
    ap.add_argument("--drain-timeout", type=float, default=90.0)
    ap.add_argument("--keep", action="store_true", help="keep each seed's folder (logs, ledger, AOF)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    if args.window < DB_LOCK_SECONDS + 2:
        ap.error(f"--window must be at least {DB_LOCK_SECONDS + 2:.0f} s (the DB lock lasts {DB_LOCK_SECONDS:.0f} s)")
    from tqdm import tqdm

    def show(r: SeedResult) -> None:
        if not args.json:
            tqdm.write(r.line(), file=sys.stdout)
            if not r.valid:
                tqdm.write("  " + r.report["audit_summary"].replace("\n", "\n  "), file=sys.stdout)
                tqdm.write(f"  ids: {json.dumps(r.report['ids'])}", file=sys.stdout)
            sys.stdout.flush()  # a line per seed as it ends, also into a pipe or file

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Ctrl-C and SIGTERM (CI cancelling) both unwind through the cleanup of every server and process;
    # SIGINT explicitly, since a shell starting this in the background hands it down ignored
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    results = run_soak(seeds, ledger=args.ledger, on_result=show, jobs=args.jobs, workers=args.workers,
                       fail_rate=args.fail_rate, max_attempts=args.max_attempts, window=args.window,
                       drain_timeout=args.drain_timeout, keep=args.keep)
    tot = totals(results)
    if args.json:
        print(json.dumps({"ledger": args.ledger, "jobs": args.jobs, "workers": args.workers,
                          "fail_rate": args.fail_rate, "totals": tot,
                          "seeds": [asdict(r) for r in results]}, default=str))
    else:
        att = " ".join(f"{k} {v}" for k, v in tot["attempts"].items())
        print(f"totals over {tot['seeds']} seed(s) ({args.ledger}): valid {tot['valid']}/{tot['seeds']} · "
              f"acknowledged {tot['acknowledged']} · lost {tot['lost']} · unexpected {tot['unexpected']} · "
              f"duplicated {tot['duplicated']} ({tot['explained']} explained / {tot['unexplained']} unexplained) · "
              f"recovered {tot['recovered']} · kills {tot['kills']} ({tot['kills_mid_run']} mid-run) · lost attempts by "
              f"{', '.join(f'{k} {v}' for k, v in tot['lost_by'].items()) or '-'} ({tot['lost_not_started']} never started) · "
              f"redis restarts {tot['redis_restarts']} · db lock held {tot['db_lock_held_s']:.1f} s · "
              f"attempts: {att} · wall {tot['wall_s']:.1f} s")
    return 0 if results and all(r.valid for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

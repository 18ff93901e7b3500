"""The soak's nemesis (``bench/soak.py``): the worker pool it kills, and the faults it injects.

Each fault can be switched on or off (``--faults`` of ``bench/soak.py``, names in :data:`FAULTS`):

* ``kill``: SIGKILL a random worker every 0.5-3 s (uniform, seeded), one whose handler is running
  (read from the handler log; the kill waits for one until the next event is due), else one past
  its start-up;
* ``redis-restart``: kill -9 the Redis primary twice and restart it on the same port and AOF;
* ``ledger-lock``: another process holds the ledger locked for 5 s (SQLite ``BEGIN EXCLUSIVE``,
  PostgreSQL ``LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE``);
* ``pg-restart``: ``pg_ctl -m fast`` stop, 0.7 s, start: about 1 s with no server (PostgreSQL ledger
  only), twice;
* ``failover``: a replica (``redis-server --replicaof``) is promoted (``REPLICAOF NO ONE``), the
  primary keeps taking writes for 0.3 s (the replication lag a promotion loses), then is killed -9.
  Clients learn the new address the way they would from Sentinel or a service registry: the soak
  publishes it (:class:`Address`); workers are replaced with the new ``QKIT_REDIS_URL`` (the ones
  still on the dead primary are SIGKILLed, counted in ``failover_kills``), enqueuers and admin
  processes re-read it when a call fails;
* ``poison``, ``admin``, ``skew``: handled by the processes of ``bench/soak_procs.py`` and the pool
  (poison-data jobs in the batch; DLQ replay/purge from separate processes; one enqueuer and one
  worker slot with their clock shifted by ±1 h through ``bench/skewed.py``).
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkit.dev.servers import Postgres, RedisServer, start_redis, start_replica

FAULTS = ("kill", "redis-restart", "ledger-lock", "pg-restart", "poison", "admin", "skew", "failover")
DB_LOCK_SECONDS = 5.0
KILL_INTERVAL = (0.5, 3.0)
REDIS_RESTARTS = 2
PG_RESTARTS = 2
PG_DOWN_SECONDS = 0.7  # plus the stop and the start: about 1 s without a server
FAILOVER_LAG_SECONDS = 0.3
SKEW_SECONDS = 3600.0
SETTLED_SECONDS = 1.5
SKEWED = str(Path(__file__).resolve().parent / "skewed.py")
REDIS_ARGS = ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]


def parse_faults(text: str) -> frozenset[str]:
    """``all``, ``none`` or a comma list of :data:`FAULTS`; raises ValueError naming an unknown one."""
    if text.strip() in ("all", ""):
        return frozenset(FAULTS)
    if text.strip() == "none":
        return frozenset()
    chosen = {f.strip() for f in text.split(",") if f.strip()}
    unknown = chosen - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(sorted(unknown))}: choose from {', '.join(FAULTS)}")
    return frozenset(chosen)


# ============================================================================ servers
def start_restartable_redis(folder: Path) -> RedisServer:
    """A redis-server with AOF on (fsynced every second, like the embedded one), restartable with
    :meth:`RedisServer.restart` on the same port and data directory."""
    return start_redis(folder, extra_args=REDIS_ARGS, timeout=20.0)


class Address:
    """The current Redis primary's URL, published in a file that clients re-read (a service registry)."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.set(url)

    def set(self, url: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(url)
        tmp.replace(self.path)
        self.url = url


# ============================================================================ workers
@dataclass
class WorkerExit:
    pid: int
    code: int
    killed: bool  # by the nemesis
    summary: dict[str, Any] | None


class WorkerPool:
    """``n`` burst worker processes (``qkit work``); a slot whose process ended gets a new one.

    ``skew`` shifts the clock of slot 0's processes by that many seconds (0: none).
    """

    def __init__(self, n: int, env: dict[str, str], logdir: Path, max_seconds: float, queue: str,
                 skew: float = 0.0) -> None:
        self.n = n
        self.env = env
        self.logdir = logdir
        self.max_seconds = max_seconds
        self.queue = queue
        self.skew = skew
        self.slots: list[subprocess.Popen | None] = [None] * n
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.exits: list[WorkerExit] = []
        self.killed: dict[int, float] = {}  # pid -> when the nemesis killed it
        self.spawned = 0
        self.skewed = 0  # processes started with a shifted clock
        self._outputs: dict[int, Path] = {}
        self._urls: dict[int, str] = {}
        self._born: dict[int, float] = {}
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="soak-workers")

    def start(self) -> None:
        self._thread.start()

    def _spawn(self, slot: int) -> subprocess.Popen:
        self.spawned += 1
        env = dict(self.env)
        if slot == 0 and self.skew:
            env["QKIT_SOAK_CLOCK_SKEW"] = str(self.skew)
            self.skewed += 1
        out = self.logdir / f"w{self.spawned:04d}.out"
        err = open(self.logdir / f"w{self.spawned:04d}.err", "w")
        with open(out, "w") as fh:
            proc = subprocess.Popen([sys.executable, SKEWED, "-m", "qkit.cli", "work", "--queue", self.queue,
                                     "--json", "--max-seconds", str(self.max_seconds)],
                                    env=env, stdout=fh, stderr=err, cwd=str(self.logdir))
        err.close()
        self._outputs[proc.pid] = out
        self._urls[proc.pid] = env["QKIT_REDIS_URL"]
        self._born[proc.pid] = time.monotonic()
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
                    self.slots[i] = None if self.stopping.is_set() else self._spawn(i)
            # a respawn rate limit, not a synchronisation: a burst that found nothing to do
            # ends at once, and four of them restarting in a tight loop would starve the others
            self.stopping.wait(0.1)

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.slots if p is not None and p.poll() is None]

    def _kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        self.killed[proc.pid] = time.monotonic()

    def kill_random(self, rng: random.Random, busy: set[int] = frozenset()) -> int | None:
        """SIGKILL one live worker chosen by ``rng``; returns its pid (None if none was alive).

        Prefers a worker in ``busy`` (running a handler), then one past its start-up (imports take
        a second or more on a loaded machine): killing one that has claimed nothing tests nothing.
        """
        with self.lock:
            alive = self.alive()
            if not alive:
                return None
            settled = [p for p in alive if time.monotonic() - self._born.get(p.pid, 0.0) >= SETTLED_SECONDS]
            victim = rng.choice(sorted([p for p in alive if p.pid in busy], key=lambda p: p.pid)
                                or settled or alive)
            self._kill(victim)
            return victim.pid

    def move_to(self, redis_url: str) -> int:
        """New workers get ``redis_url``; the live ones still on another address are SIGKILLed
        (an orchestrator replacing them).  Returns how many were killed."""
        with self.lock:
            self.env = {**self.env, "QKIT_REDIS_URL": redis_url}
            stale = [p for p in self.alive() if self._urls.get(p.pid) != redis_url]
            for proc in stale:
                self._kill(proc)
            return len(stale)

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


class HandlerLogTail:
    """Which worker processes are running a handler now: the last line of each pid in the
    handler log (``bench/soak_handlers.py``) is a ``start``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.last: dict[int, str] = {}
        self.partial = b""

    def busy(self) -> set[int]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return set()
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            parts = line.split()
            if len(parts) >= 4 and parts[3].isdigit():
                self.last[int(parts[3])] = parts[0].decode()
        return {pid for pid, what in self.last.items() if what == "start"}


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
    pg_restarts: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds down)
    failovers: list[tuple[float, str]] = field(default_factory=list)  # (t, the new primary's URL)
    failover_kills: int = 0  # workers SIGKILLed because they were on the dead primary


def nemesis_plan(rng: random.Random, window: float, faults: frozenset[str] = frozenset(FAULTS),
                 postgres: bool = False) -> list[tuple[float, str]]:
    """The seeded schedule: (seconds from the start, what) in time order.

    The draws for the original three faults come first and in the original order, so a seed's
    kills, Redis restarts and ledger lock fall where they always did.
    """
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
    lock_at = rng.uniform(1.0, max(1.5, window - DB_LOCK_SECONDS - 0.5))
    events.append((lock_at, "dblock"))
    # a PostgreSQL restart would cut the locking session: keep the two apart (the lock is one fault,
    # the restart another; both together would only test that a lock dies with its server)
    busy = (lock_at - PG_DOWN_SECONDS - 1.0, lock_at + DB_LOCK_SECONDS + 1.0)
    free = [(a, b) for a, b in ((0.5, busy[0]), (busy[1], window - PG_DOWN_SECONDS - 0.5)) if b - a > 0.2]
    if "ledger-lock" not in faults or not free:
        free = [(0.5, window - PG_DOWN_SECONDS - 0.5)]
    for _ in range(PG_RESTARTS):
        a, b = rng.choice(free)
        events.append((rng.uniform(a, b), "pg"))
    events.append((rng.uniform(window * 0.3, window * 0.7), "failover"))
    wanted = {"kill": "kill", "redis": "redis-restart", "dblock": "ledger-lock", "pg": "pg-restart",
              "failover": "failover"}
    return sorted((at, what) for at, what in events
                  if wanted[what] in faults and (what != "pg" or postgres))


class Nemesis(threading.Thread):
    def __init__(self, plan: list[tuple[float, str]], rng: random.Random, pool: WorkerPool,
                 redis_server: RedisServer, database_url: str, t0: float, *, address: Address | None = None,
                 replica: RedisServer | None = None, postgres: Postgres | None = None,
                 handler_log: Path | None = None) -> None:
        super().__init__(daemon=True, name="soak-nemesis")
        self.plan, self.rng, self.pool, self.redis = plan, rng, pool, redis_server
        self.database_url, self.t0 = database_url, t0
        self.address, self.replica, self.postgres = address, replica, postgres
        self.tail = HandlerLogTail(handler_log) if handler_log is not None else None
        self.retired: list[RedisServer] = []  # primaries killed by a failover (stopped by the seed)
        self.log = NemesisLog()
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n, (at, what) in enumerate(self.plan):
                if self.halt.wait(max(0.0, self.t0 + at - time.monotonic())):
                    return
                now = time.monotonic() - self.t0
                if what == "kill":
                    # a kill is meant to land mid-handler: wait for a busy worker, at most until the next event
                    next_at = self.plan[n + 1][0] if n + 1 < len(self.plan) else at + KILL_INTERVAL[0]
                    busy = self._busy()
                    while not (busy & {p.pid for p in self.pool.alive()}) and \
                            time.monotonic() - self.t0 < min(next_at, at + KILL_INTERVAL[1]):
                        if self.halt.wait(0.05):
                            return
                        busy = self._busy()
                    now = time.monotonic() - self.t0
                    pid = self.pool.kill_random(self.rng, busy)
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
                elif what == "pg" and self.postgres is not None:
                    # the plan keeps a restart 1 s clear of the lock, but a lock process that started late
                    # on a loaded machine would be cut by it (the lock is one fault, the restart another)
                    for lock in self.log.db_locks:
                        lock.wait()
                    self.log.pg_restarts.append((now, self.postgres.restart("fast", down=PG_DOWN_SECONDS)))
                elif what == "failover" and self.replica is not None:
                    self.failover(now)
        except BaseException as exc:  # noqa: BLE001 - reported by the seed
            self.error = exc

    def _busy(self) -> set[int]:
        return self.tail.busy() if self.tail is not None else set()

    def failover(self, now: float) -> None:
        """Promote the replica, let the old primary take writes the replica never sees, kill it,
        and move every client to the new primary."""
        replica, old = self.replica, self.redis
        assert replica is not None
        replica.promote()
        time.sleep(FAILOVER_LAG_SECONDS)  # acknowledged by the old primary, never replicated: lost
        old.crash()
        self.retired.append(old)
        self.redis, self.replica = replica, None
        if self.address is not None:
            self.address.set(replica.url)
        self.log.failover_kills += self.pool.move_to(replica.url)
        self.log.failovers.append((now, replica.url))


def start_failover_pair(folder: Path) -> tuple[RedisServer, RedisServer]:
    """A primary and its synced replica, both with AOF on."""
    primary = start_restartable_redis(folder)
    try:
        return primary, start_replica(primary, folder, extra_args=REDIS_ARGS)
    except BaseException:
        primary.stop()
        raise

"""No-op job throughput of qkit, with the cost per job, in one JSON line.

    python bench/throughput.py --n 20000 --backend embedded|redis|upstash --ledger sqlite|postgres
        [--latency-ms 5] [--concurrency K] [--vs huey,rq] [--redis-url URL] [--database-url URL]
        [--batch 10000] [--idle-s 1] [--profile DIR]

Method (the same as the peers' harness, ``bench/peers/README.md``):

* **enqueue**: N no-op jobs through ``Queue.enqueue_many`` (``--batch`` jobs per
  call), timed in this process;
* **drain**: ONE burst worker process (``bench/burst_worker.py``, i.e.
  ``q.work()``), timed from just before the process is spawned to the end of
  its burst (start-up included, as for the peers);
* **e2e**: N / (enqueue + drain).

Costs per job: Redis commands counted client-side by the backends (both
processes: the worker sends its counters back in its JSON line) and
server-side with ``INFO commandstats`` (which also counts the commands Lua
scripts run); HTTP requests (Upstash; client-side and as served by the local
endpoint); ledger statements (``Ledger.statements`` of both processes, and the
SQL calls actually executed, counted with a SQLAlchemy event); the worker's
peak RSS (``os.wait4`` rusage of that child, and ``RUSAGE_CHILDREN``); Redis
``used_memory`` growth per pending job after the enqueue; and the commands
Redis served while no burst ran (``--idle-s``).

It starts what it needs and stops it at the end: a fresh ``QKIT_HOME`` with
its embedded server, ``/usr/bin/redis-server`` on a free port (unless
``--redis-url``), a throw-away PostgreSQL (unless ``--database-url``), and
qkit's local Upstash endpoint with ``--latency-ms``.  ``--vs huey,rq`` then runs
those peers' scripts from ``bench/peers/`` (their worker logs go to the
temporary folder) against the same Redis server and adds the ratios
qkit/peer.  The peers FLUSHALL that server.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import redis  # noqa: E402

import qkit  # noqa: E402
from burst_worker import count_sql, wrap_timer  # noqa: E402
from servers import Postgres, UpstashEndpoint, start_postgres, start_redis, start_upstash  # noqa: E402

#: the peer harness (bench/peers/README.md): one ``<name>_peer.py`` per peer queue
PEERS_DIR = BENCH / "peers"
PEERS = ("bullmq", "huey", "rq", "arq", "saq", "dramatiq", "celery")
HANDLERS_MODULE = "noop_handlers"


# --------------------------------------------------------------------------- server-side probe
class Probe:
    """A redis-py client on the server behind qkit, for INFO snapshots that exclude themselves.

    Every command this probe sends is counted, so the deltas it reports hold
    only what others (qkit, the endpoint, the peers) sent.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.own: Counter[str] = Counter()

    def cmdstats(self) -> tuple[dict[str, int], Counter[str]]:
        """Calls per command so far, with this probe's own calls before this one."""
        own_before = Counter(self.own)
        stats = {k[len("cmdstat_"):]: int(v["calls"]) for k, v in self.client.info("commandstats").items()}
        self.own["info"] += 1
        return stats, own_before

    @staticmethod
    def delta(a: tuple[dict[str, int], Counter[str]], b: tuple[dict[str, int], Counter[str]]) -> dict[str, int]:
        """Commands others sent between snapshots ``a`` and ``b``, biggest first."""
        stats_a, own_a = a
        stats_b, own_b = b
        mine = own_b - own_a
        d = {k: stats_b.get(k, 0) - stats_a.get(k, 0) - mine.get(k, 0) for k in set(stats_b) | set(stats_a)}
        return dict(sorted(((k, v) for k, v in d.items() if v), key=lambda kv: -kv[1]))

    def cpu_s(self) -> float:
        """The server's CPU seconds so far (user + system, INFO cpu)."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def used_memory(self) -> int:
        info = self.client.info("memory")
        self.own["info"] += 1
        return int(info["used_memory"])

    def key_bytes(self, pattern: str) -> dict[str, int]:
        """MEMORY USAGE (exact, SAMPLES 0) of every key matching ``pattern``."""
        keys = self.client.keys(pattern)
        self.own["keys"] += 1
        out = {}
        for key in sorted(keys):
            size = self.client.memory_usage(key, samples=0)
            self.own["memory|usage"] += 1
            out[key if isinstance(key, str) else key.decode()] = int(size or 0)
        return out

    def version(self) -> str:
        info = self.client.info("server")
        self.own["info"] += 1
        name = "valkey" if "valkey_version" in info else "redis"
        return f"{name} {info.get('valkey_version') or info.get('redis_version')}"


# --------------------------------------------------------------------------- the stack under test
@dataclass
class Stack:
    """The servers one benchmark talks to, and how qkit reaches them."""

    backend: str
    ledger: str
    tmp: Path
    home: Path
    overrides: dict[str, Any]
    env_vars: dict[str, str]
    probe: Probe | None = None
    peer_url: str | None = None  # the same Redis server, for the peers (may carry a password)
    endpoint: UpstashEndpoint | None = None
    postgres: Postgres | None = None
    database_url_given: str | None = None
    endpoint_nodelay: bool | None = None  # upstash: TCP_NODELAY forced on the local endpoint
    server: str = ""
    closers: list[Callable[[], None]] = field(default_factory=list)

    def database_url(self, name: str) -> str:
        """A fresh ledger for one run (its own SQLite file or PostgreSQL database)."""
        if self.database_url_given:
            return self.database_url_given
        if self.ledger == "postgres":
            assert self.postgres is not None
            return self.postgres.database(f"bench_{name}".replace("-", "_"))
        return f"sqlite:///{self.tmp / f'ledger-{name}.sqlite3'}"

    def child_env(self, database_url: str) -> dict[str, str]:
        """Environment of the worker process: this stack's settings and the bench handlers."""
        drop = ("QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_DATABASE_URL",
                "QKIT_HOME", "QKIT_HANDLERS")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(self.env_vars)
        env["QKIT_DATABASE_URL"] = database_url
        env["QKIT_HANDLERS"] = HANDLERS_MODULE
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
        return env

    def close(self) -> None:
        """Stop everything this stack started, newest first."""
        while self.closers:
            try:
                self.closers.pop()()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"bench: cleanup step failed: {exc}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_stack(backend: str, ledger: str, *, latency_ms: float = 0.0, redis_url: str | None = None,
               database_url: str | None = None, endpoint_nodelay: bool = True) -> Stack:
    """Start (or attach to) the servers for ``backend`` x ``ledger``."""
    tmp = Path(tempfile.mkdtemp(prefix="qkit-bench-"))
    home = tmp / "home"
    home.mkdir()
    stack = Stack(backend, ledger, tmp, home, {"home": home}, {"QKIT_HOME": str(home)},
                  database_url_given=database_url)
    try:
        if backend == "embedded":
            from qkit.backends.embedded import EmbeddedServer

            server = EmbeddedServer(home)
            stack.closers.append(server.stop)
            client = server.connect()  # starts the daemonized server under this fresh QKIT_HOME
            stack.probe = Probe(client)
            info = json.loads(server.info_file.read_text())
            password = server.password_file.read_text().strip()
            stack.peer_url = (f"unix://{info['socket']}?db=0&password={password}" if info.get("socket")
                              else f"redis://:{password}@127.0.0.1:{info['port']}/0")
        else:
            url = redis_url
            if url is None:
                rs = start_redis(tmp)
                stack.closers.append(rs.stop)
                url = rs.url
            stack.probe = Probe(redis.Redis.from_url(url, decode_responses=True, protocol=2))
            stack.peer_url = url
            if backend == "redis":
                stack.overrides["redis_url"] = url
                stack.env_vars["QKIT_REDIS_URL"] = url
            elif backend == "upstash":
                ep = start_upstash(url, latency_ms, nodelay=endpoint_nodelay)
                stack.endpoint_nodelay = endpoint_nodelay
                stack.closers.append(ep.stop)
                stack.endpoint = ep
                stack.overrides.update(upstash_url=ep.url, upstash_token=ep.token)
                stack.env_vars.update(UPSTASH_REDIS_REST_URL=ep.url, UPSTASH_REDIS_REST_TOKEN=ep.token)
            else:
                raise ValueError(f"unknown backend {backend!r}")
        stack.closers.append(stack.probe.client.close)
        stack.server = stack.probe.version()
        if ledger == "postgres" and database_url is None:
            pg_dir = Path(tempfile.mkdtemp(prefix="qkit-bench-pg-"))
            stack.postgres = start_postgres(pg_dir)
            stack.closers.append(lambda: shutil.rmtree(pg_dir, ignore_errors=True))
            stack.closers.append(stack.postgres.stop)
        elif ledger not in ("sqlite", "postgres"):
            raise ValueError(f"unknown ledger {ledger!r}")
    except BaseException:
        stack.close()
        raise
    return stack


# --------------------------------------------------------------------------- one measurement
def _wait_child(p: subprocess.Popen, timeout: float) -> Any:
    """Reap the worker with ``os.wait4`` (its own rusage), killing it after ``timeout`` s."""
    timer = threading.Timer(timeout, lambda: _kill_group(p.pid))
    timer.start()
    try:
        _, status, usage = os.wait4(p.pid, 0)
    finally:
        timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    return usage


def _merge_workers(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker's JSON line from several: counts summed, the first start-up and the last end."""
    if len(outs) == 1:
        return outs[0]
    w = dict(outs[0])
    w["t_end"] = max(o["t_end"] for o in outs)
    for key in ("t_import", "t_connected", "t_burst"):
        w[key] = min(o[key] for o in outs)
    w["summary"] = {k: (sum(o["summary"].get(k) or 0 for o in outs) if isinstance(v, (int, float)) else v)
                    for k, v in outs[0]["summary"].items()}
    w["counters"] = {k: sum(o["counters"][k] for o in outs) for k in outs[0]["counters"]}
    w["ledger_statements"] = sum(o["ledger_statements"] for o in outs)
    w["sql"] = {k: sum(o["sql"][k] for o in outs) for k in outs[0]["sql"]}
    w["maxrss_kb_self"] = max(o["maxrss_kb_self"] for o in outs)
    w["phases_s"] = {}  # per-step timings are one process's: not summed
    return w


def _merge_usage(usages: list[Any]) -> Any:
    """The rusage fields the report reads, over several children (CPU summed, peak RSS the largest)."""
    from types import SimpleNamespace

    return SimpleNamespace(ru_utime=sum(u.ru_utime for u in usages), ru_stime=sum(u.ru_stime for u in usages),
                           ru_maxrss=max(u.ru_maxrss for u in usages))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write_profile(profiler: Any, prefix: Path) -> None:
    from burst_worker import write_profile

    write_profile(profiler, str(prefix))


def run_once(stack: Stack, n: int, *, queue: str = "bench", job_type: str = "noop",
             payload: dict[str, Any] | None = None, concurrency: int = 1, batch: int = 10_000,
             idle_s: float = 1.0, profile_dir: Path | None = None, timeout: float = 1800.0,
             workers: int = 1) -> dict[str, Any]:
    """Enqueue ``n`` jobs, drain them with ``workers`` burst worker processes started together, return every
    figure (the drain ends when the last worker exits)."""
    import resource

    payload = {} if payload is None else payload
    db = stack.database_url(queue)
    probe = stack.probe
    q = qkit.connect(queue, database_url=db, **stack.overrides)
    sql_parent = count_sql([q.ledger.engine, q.ledger.read_engine])
    enq_phases: dict[str, float] = {}
    wrap_timer(enq_phases, q.ledger, "insert_jobs", "ledger_insert")  # one transaction per call
    wrap_timer(enq_phases, q.dispatch, "push", "redis_push")         # one script call per 1,000 jobs
    res: dict[str, Any] = {"system": "qkit", "version": qkit.__version__, "backend": stack.backend,
                           "ledger": stack.ledger, "server": stack.server, "n": n, "job_type": job_type,
                           "concurrency": concurrency, "workers": workers, "batch": batch, "git": git_state(),
                           "python": sys.version.split()[0],
                           "loadavg_1m": round(os.getloadavg()[0], 2)}
    try:
        # ---------------------------------------------------------------- enqueue
        s0 = probe.cmdstats() if probe else None
        m0 = probe.used_memory() if probe else None
        cpu0 = _cpu_now(stack)
        ep0 = _endpoint_counts(stack)
        c0 = q.backend.counters()
        st0 = q.ledger.statements
        profiler = None
        if profile_dir is not None:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            k = min(batch, n - start)
            q.enqueue_many([{"type": job_type, "payload": payload} for _ in range(k)])
        enqueue_s = time.perf_counter() - t0
        cpu1 = _cpu_now(stack)
        if profiler is not None:
            profiler.stop()
            _write_profile(profiler, profile_dir / "enqueue")
        c1 = q.backend.counters()
        st1 = q.ledger.statements
        res["enqueue_us_per_job"] = {k: round(v / n * 1e6, 2) for k, v in enq_phases.items()}
        # the rest: building items, validation (qkit.model), id bookkeeping
        res["enqueue_us_per_job"]["other"] = round((enqueue_s - sum(enq_phases.values())) / n * 1e6, 2)
        sql_enqueue = dict(sql_parent)
        ep1 = _endpoint_counts(stack)
        m1 = probe.used_memory() if probe else None
        s1 = probe.cmdstats() if probe else None
        if probe:
            res["redis_bytes_per_pending_job"] = round((m1 - m0) / n, 1)
            res["redis_used_memory_delta"] = m1 - m0
            res["redis_key_bytes"] = probe.key_bytes(f"qkit:{{{queue}}}:*")
            res["redis_key_bytes_per_pending_job"] = round(sum(res["redis_key_bytes"].values()) / n, 1)
            s1 = probe.cmdstats()  # MEMORY USAGE / KEYS above are the probe's own; start the drain window here

        # ---------------------------------------------------------------- drain
        argv = [sys.executable, str(BENCH / "burst_worker.py"), "--queue", queue, "--concurrency", str(concurrency)]
        if profile_dir is not None:
            argv += ["--profile", str(profile_dir / "worker")]
        procs: list[tuple[subprocess.Popen, Path, Path]] = []
        t_spawn = time.time()
        for k in range(workers):  # started together; each is one burst on the same queue
            out_path = stack.tmp / f"worker-{queue}-{k}.out"
            err_path = stack.tmp / f"worker-{queue}-{k}.err"
            with open(out_path, "w") as out, open(err_path, "w") as err:
                procs.append((subprocess.Popen(argv, cwd=str(ROOT), env=stack.child_env(db), stdout=out, stderr=err,
                                               start_new_session=True), out_path, err_path))
        usages = [_wait_child(p, timeout) for p, _, _ in procs]
        t_exit = time.time()
        cpu2 = _cpu_now(stack)
        ep2 = _endpoint_counts(stack)
        s2 = probe.cmdstats() if probe else None
        outs = []
        for p, out_path, err_path in procs:
            lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"worker exited {p.returncode}: {err_path.read_text()[-3000:]}")
            outs.append(json.loads(lines[-1]))
        w = _merge_workers(outs)
        usage = _merge_usage(usages)

        # ---------------------------------------------------------------- idle
        idle = None
        if probe and idle_s > 0:
            time.sleep(idle_s)  # the window itself: nothing runs, we count what Redis still receives
            s3 = probe.cmdstats()
            idle = Probe.delta(s2, s3)

        drain_s = w["t_end"] - t_spawn
        summary = w["summary"]
        res.update(
            completed=summary.get("completed"), processed=summary.get("processed"),
            failed=summary.get("failed"), retried=summary.get("retried"), stopped_by=summary.get("stopped_by"),
            enqueue_s=round(enqueue_s, 4), drain_s=round(drain_s, 4),
            enqueue_jobs_per_s=round(n / enqueue_s, 1), drain_jobs_per_s=round(n / drain_s, 1),
            e2e_jobs_per_s=round(n / (enqueue_s + drain_s), 1),
            # as if the worker had been started before the enqueue (BullMQ's "warm" round is timed this way)
            e2e_warm_jobs_per_s=round(n / (enqueue_s + drain_s - (w["t_burst"] - t_spawn)), 1),
            worker_startup_s=round(w["t_burst"] - t_spawn, 4),
            worker_import_s=round(w["t_import"] - t_spawn, 4),
            burst_s=round(w["t_end"] - w["t_burst"], 4),
            burst_jobs_per_s=round(n / max(w["t_end"] - w["t_burst"], 1e-9), 1),
            worker_exit_s=round(t_exit - w["t_end"], 4),
        )
        enq_client = c1["commands"] - c0["commands"]
        drain_client = w["counters"]["commands"]
        res.update(
            redis_cmds_per_job=round((enq_client + drain_client) / n, 5),
            redis_cmds_per_job_enqueue=round(enq_client / n, 5),
            redis_cmds_per_job_drain=round(drain_client / n, 5),
            redis_cmds={"enqueue": enq_client, "drain": drain_client},
        )
        if probe:
            enq_server, drain_server = Probe.delta(s0, s1), Probe.delta(s1, s2)
            scripts = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall")
            client_issued = sum(v for d in (enq_server, drain_server) for k, v in d.items() if k in scripts)
            res.update(
                redis_server_cmds_per_job=round((sum(enq_server.values()) + sum(drain_server.values())) / n, 4),
                redis_server_script_calls_per_job=round(client_issued / n, 5),
                redis_server_cmds={"enqueue": enq_server, "drain": drain_server},
                idle_s=idle_s if idle is not None else 0,
                idle_redis_cmds=sum(idle.values()) if idle is not None else None,
                idle_redis_cmds_detail=idle,
            )
        else:
            res.update(redis_server_cmds_per_job=None, idle_redis_cmds=None)
        enq_req = c1["requests"] - c0["requests"]
        drain_req = w["counters"]["requests"]
        if stack.backend == "upstash":
            res.update(
                http_requests_per_job=round((enq_req + drain_req) / n, 5),
                http_requests={"enqueue": enq_req, "drain": drain_req},
                endpoint_requests_per_job=round((ep2["requests"] - ep0["requests"]) / n, 5),
                endpoint_requests={"enqueue": ep1["requests"] - ep0["requests"],
                                   "drain": ep2["requests"] - ep1["requests"]},
                latency_ms=stack.endpoint.app.state.latency_ms if stack.endpoint else None,
                endpoint_nodelay=stack.endpoint_nodelay,
            )
        else:
            res.update(http_requests_per_job=0.0)
        res.update(
            ledger_statements_per_job=round(((st1 - st0) + w["ledger_statements"]) / n, 5),
            ledger_statements={"enqueue": st1 - st0, "drain": w["ledger_statements"]},
            sql_calls_per_job=round((sql_enqueue["calls"] + w["sql"]["calls"]) / n, 5),
            sql_calls={"enqueue": sql_enqueue, "drain": w["sql"]},
            worker_peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
            worker_peak_rss_self_mb=round(w["maxrss_kb_self"] / 1024, 1),
            rusage_children_maxrss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            worker_cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
        )
        # CPU summed over every process of the run: steadier than wall-clock rates on a shared machine
        cpu = {"enqueue_process": cpu1["self"] - cpu0["self"], "worker": usage.ru_utime + usage.ru_stime,
               "redis": cpu2["redis"] - cpu0["redis"], "postgres": cpu2["postgres"] - cpu0["postgres"]}
        cpu = {k: round(v, 3) for k, v in cpu.items()}
        res.update(cpu_s=cpu, cpu_s_total=round(sum(cpu.values()), 3),
                   cpu_us_per_job=round(sum(cpu.values()) / n * 1e6, 1))
        phases = w.get("phases_s") or {}
        if phases:
            # where the burst's time went, per job; "other" is the loop itself and anything untimed
            burst = w["t_end"] - w["t_burst"]
            per_job = {k: round(v / n * 1e6, 2) for k, v in phases.items()}
            per_job["other"] = round((burst - sum(phases.values())) / n * 1e6, 2)
            res["burst_us_per_job"] = per_job
            res["startup_s"] = {"import": round(w["t_import"] - t_spawn, 4),
                                "connect": round(w["t_connected"] - w["t_import"], 4),
                                "to_burst": round(w["t_burst"] - w["t_connected"], 4)}
        if profile_dir is not None:
            res["profiled"] = True
            res["profiles"] = {"enqueue": str(profile_dir / "enqueue.txt"), "worker": str(profile_dir / "worker.txt")}
    finally:
        q.close()
    return res


def _cpu_now(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of this process, the Redis server (INFO cpu) and the stack's own PostgreSQL (its
    postmaster and children, psutil; backends that exited in between are missed, so that figure is a floor)."""
    import resource

    import psutil

    me = resource.getrusage(resource.RUSAGE_SELF)
    pg = 0.0
    if stack.postgres is not None:
        for pid_file in Path(stack.postgres.folder).rglob("postmaster.pid"):
            try:
                main = psutil.Process(int(pid_file.read_text().split()[0]))
                for proc in [main, *main.children(recursive=True)]:
                    times = proc.cpu_times()
                    pg += times.user + times.system
            except (psutil.Error, ValueError, OSError):
                continue
    return {"self": me.ru_utime + me.ru_stime, "redis": stack.probe.cpu_s() if stack.probe else 0.0,
            "postgres": pg}


def git_state() -> str:
    """``git describe --always --dirty`` of the checkout measured (the code changes under us)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=str(ROOT), capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _endpoint_counts(stack: Stack) -> dict[str, int]:
    if stack.endpoint is None:
        return {"requests": 0, "commands": 0}
    s = stack.endpoint.stats
    return {"requests": int(s.requests), "commands": int(s.commands)}


# --------------------------------------------------------------------------- peers
def run_peers(names: list[str], n: int, url: str, workdir: Path, timeout: float = 1800.0,
              raw_n: int = 0) -> dict[str, Any]:
    """Run ``bench/peers/<name>_peer.py`` against ``url``; their worker logs go to ``workdir``."""
    results = workdir / "peer-results"
    results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for name in names:
        script = PEERS_DIR / f"{name}_peer.py"
        if not script.exists():
            out[name] = {"error": f"no {script.name} in {PEERS_DIR}"}
            continue
        env = dict(os.environ, BENCH_RESULTS_DIR=str(results),
                   PYTHONPATH=os.pathsep.join(p for p in (str(PEERS_DIR), os.environ.get("PYTHONPATH", "")) if p))
        proc = subprocess.run([sys.executable, script.name, "--n", str(n), "--redis-url", url, "--raw-n", str(raw_n),
                               "--timeout", str(timeout)], cwd=str(PEERS_DIR), env=env, capture_output=True,
                              text=True, timeout=timeout + 120)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout)[-1500:]
            out[name] = {"error": f"{name}_peer.py exited {proc.returncode}: {tail}"}
            continue
        out[name] = json.loads(lines[-1])
    return out


def median_peers(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per peer, the run with the median best end-to-end rate (with every run's rate attached)."""
    out: dict[str, Any] = {}
    for name in runs[0]:
        ok = [r[name] for r in runs if "error" not in r[name]]
        if not ok:
            out[name] = runs[0][name]
            continue
        best = lambda p: max(p["jobs_per_s_end_to_end"], p.get("jobs_per_s_end_to_end_bulk") or 0)  # noqa: E731
        ok.sort(key=best)
        out[name] = dict(ok[(len(ok) - 1) // 2])
        out[name]["e2e_best_all"] = [round(best(p), 1) for p in ok]
    return out


def peer_ratios(qkit_res: dict[str, Any], peers: dict[str, Any]) -> dict[str, Any]:
    """qkit / peer for each rate, plus the peer's own headline figures."""
    out: dict[str, Any] = {}
    for name, p in peers.items():
        if "error" in p:
            out[name] = p
            continue
        n = p["n"]
        enq_single = n / p["enqueue_single_s"]
        enq_bulk = n / p["enqueue_bulk_s"] if p.get("enqueue_bulk_s") else None
        drain = n / p["drain_s"]
        e2e = p["jobs_per_s_end_to_end"]
        e2e_bulk = p.get("jobs_per_s_end_to_end_bulk")
        best = max(e2e, e2e_bulk or 0)
        out[name] = {
            "version": p.get("version"), "config": p.get("config"),
            "enqueue_jobs_per_s": round(enq_single, 1),
            "enqueue_bulk_jobs_per_s": round(enq_bulk, 1) if enq_bulk else None,
            "drain_jobs_per_s": round(drain, 1),
            "e2e_jobs_per_s": round(e2e, 1),
            "e2e_bulk_jobs_per_s": round(e2e_bulk, 1) if e2e_bulk else None,
            "redis_cmds_per_job": p.get("redis_cmds_per_job"),
            "worker_startup_s": round(p.get("worker_startup_s", 0), 3),
            "e2e_best_all": p.get("e2e_best_all"),
            # a worker created in the process that enqueued (no start-up), against qkit's e2e without its start-up
            "e2e_warm_jobs_per_s": round(p["jobs_per_s_end_to_end_warm"], 1) if p.get("jobs_per_s_end_to_end_warm")
            else None,
            "ratio_e2e_warm": (round(qkit_res["e2e_warm_jobs_per_s"] / p["jobs_per_s_end_to_end_warm"], 2)
                               if p.get("jobs_per_s_end_to_end_warm") and qkit_res.get("e2e_warm_jobs_per_s")
                               else None),
            # qkit's figure divided by the peer's; e2e against the peer's better variant (bulk or not)
            "ratio_e2e": round(qkit_res["e2e_jobs_per_s"] / best, 2),
            "ratio_e2e_vs_single": round(qkit_res["e2e_jobs_per_s"] / e2e, 2),
            "ratio_drain": round(qkit_res["drain_jobs_per_s"] / drain, 2),
            "ratio_enqueue": round(qkit_res["enqueue_jobs_per_s"] / max(enq_single, enq_bulk or 0), 2),
            "cpu_s": p.get("cpu_s"),
            "cpu_us_per_job": round(p["cpu_s"] / n * 1e6, 1) if p.get("cpu_s") else None,
            "ratio_cpu_per_job": (round(p["cpu_s"] / qkit_res["cpu_s_total"], 2)
                                  if p.get("cpu_s") and qkit_res.get("cpu_s_total") else None),
            "ratio_redis_server_cmds": (round(qkit_res["redis_server_cmds_per_job"] / p["redis_cmds_per_job"], 4)
                                        if qkit_res.get("redis_server_cmds_per_job") is not None
                                        and p.get("redis_cmds_per_job") else None),
        }
    return out


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--n", type=int, default=20000, help="jobs (default 20000)")
    p.add_argument("--backend", choices=("embedded", "redis", "upstash"), default="embedded")
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--latency-ms", type=float, default=0.0, help="injected latency of the local Upstash endpoint")
    p.add_argument("--concurrency", type=int, default=1, help="handler threads of the worker")
    p.add_argument("--workers", type=int, default=1, help="burst worker processes started together (default 1)")
    p.add_argument("--vs", default="", help="comma-separated peers from bench-peers: huey,rq,...")
    p.add_argument("--peers-redis", choices=("same", "tcp", "both"), default="same",
                   help="peers run on qkit's Redis server (same), on a fresh TCP redis-server (tcp), or both")
    p.add_argument("--redis-url", default=None, help="use this Redis (redis/upstash backends) instead of starting one")
    p.add_argument("--database-url", default=None, help="use this PostgreSQL instead of starting one")
    p.add_argument("--batch", type=int, default=10_000, help="jobs per enqueue_many call (max 100000)")
    p.add_argument("--idle-s", type=float, default=1.0, help="after the burst, count Redis commands for this long")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile enqueue (in-process) and the worker with pyinstrument into DIR (slows the run)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs in this invocation (fresh queue and ledger each); report the median-e2e run")
    p.add_argument("--endpoint-as-is", action="store_true",
                   help="upstash: leave the local endpoint's sockets without TCP_NODELAY (see bench/servers.py)")
    p.add_argument("--queue", default="bench")
    p.add_argument("--timeout", type=float, default=1800.0)
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be >= 1")
    if not 1 <= a.batch <= 100_000:
        p.error("--batch must be 1..100000")
    a.vs = [s.strip() for s in a.vs.split(",") if s.strip()]
    for name in a.vs:
        if name not in PEERS:
            p.error(f"--vs: unknown peer {name!r} (one of {', '.join(PEERS)})")
    if a.database_url and a.ledger != "postgres":
        a.ledger = "postgres" if a.database_url.startswith("postgres") else a.ledger
    return a


def compile_qkit() -> None:
    """Write qkit's bytecode once, as ``pip install`` does: with ``PYTHONDONTWRITEBYTECODE`` set (this
    machine's environment) every spawned worker would otherwise compile its modules again (~40 ms)."""
    import compileall

    compileall.compile_dir(str(ROOT / "qkit"), quiet=1)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark and print one JSON line."""
    a = parse_args(argv)
    compile_qkit()
    stack = open_stack(a.backend, a.ledger, latency_ms=a.latency_ms, redis_url=a.redis_url,
                       database_url=a.database_url, endpoint_nodelay=not a.endpoint_as_is)
    try:
        profile_dir = None
        if a.profile:
            profile_dir = Path(a.profile).resolve()
            profile_dir.mkdir(parents=True, exist_ok=True)
        runs = []
        for i in range(a.repeat):
            runs.append(run_once(stack, a.n, queue=a.queue if a.repeat == 1 else f"{a.queue}-{i + 1}",
                                 concurrency=a.concurrency, batch=a.batch, idle_s=a.idle_s, workers=a.workers,
                                 profile_dir=profile_dir if i == 0 else None, timeout=a.timeout))
        res = median_run(runs)
        if stack.backend == "upstash":
            res["latency_ms"] = a.latency_ms
        if a.vs:
            if not stack.peer_url:
                raise RuntimeError("--vs needs a Redis server reachable by redis-py")
            res["vs"] = {}
            if a.peers_redis in ("same", "both"):
                peers = median_peers([run_peers(a.vs, a.n, stack.peer_url, stack.tmp, timeout=a.timeout)
                                      for _ in range(a.repeat)])
                res["vs"].update(peer_ratios(res, peers))
                res["vs_server"] = stack.server
            if a.peers_redis in ("tcp", "both"):
                # the peers' own setting (bench/peers/README.md): a plain redis-server on a loopback TCP port
                rs = start_redis(stack.tmp)
                stack.closers.append(rs.stop)
                peers = median_peers([run_peers(a.vs, a.n, rs.url, stack.tmp, timeout=a.timeout)
                                      for _ in range(a.repeat)])
                res["vs"].update({f"{k}@tcp": v for k, v in peer_ratios(res, peers).items()})
    finally:
        stack.close()
    print(json.dumps(res, default=str), flush=True)
    return 0


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median end-to-end rate, plus every run's headline rates.

    The machine is shared and noisy (+-8% between runs of the same figure), so
    a figure is read from the median of ``--repeat`` runs in one invocation.
    """
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r["e2e_jobs_per_s"])
    res = dict(ordered[(len(ordered) - 1) // 2])
    res["repeat"] = len(runs)
    for key in ("enqueue_jobs_per_s", "drain_jobs_per_s", "e2e_jobs_per_s", "e2e_warm_jobs_per_s", "burst_jobs_per_s"):
        res[key + "_all"] = [r[key] for r in runs]
        res[key + "_median"] = statistics.median(r[key] for r in runs)
    return res


if __name__ == "__main__":
    sys.exit(main())

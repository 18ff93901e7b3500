"""Enqueue -> handler start latency of a long-running worker, qkit beside BullMQ (issue 17).

    python bench/latency.py [--rate 200] [--seconds 10] [--ledger sqlite|postgres] [--no-bullmq] [--trace]

A throw-away redis-server on a free port.  qkit: one `qkit work --forever` process (QKIT_REDIS_URL, a SQLite
ledger under a fresh QKIT_HOME, or PostgreSQL), and this process as the producer, calling `q.enqueue` once
every 1/rate s (each call acknowledged: the ledger row is on disk and the job pushed) with handler `stamp`
(bench/noop_handlers.py), which returns its start time.  Two delays per job: from the enqueue call and from
its acknowledgment (the call's return) to the handler's start.  BullMQ (bench/node/bullmq_peer.mjs): the same
rate, a Worker in a child process, each `queue.add` awaited, the delay from the add call to the handler's
start.  One JSON line with p50/p90/p99/max (ms) of each, the worker's Redis commands while idle, and the
machine's load.  ``--trace`` adds qkit's steps, stamped in both processes (bench/latency_trace.py): the
enqueue's ledger insert and push, the wake-up, the claim script, the ledger claim, the handler thread.
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
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bullmq  # noqa: E402  (bench/bullmq.py)
from servers import start_postgres, start_redis  # noqa: E402


_CLI = "import sys; from qkit.cli import entry_point; sys.argv[0] = 'qkit'; entry_point()"


def quantiles(values: list[float]) -> dict:
    v = sorted(values)
    pick = lambda q: round(v[min(len(v) - 1, int(q * len(v)))], 3)  # noqa: E731
    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "max_ms": round(v[-1], 3),
            "mean_ms": round(statistics.fmean(v), 3), "jobs": len(v)}


def idle_commands(redis_client, seconds: float) -> int:
    """Commands the server received in ``seconds`` while only the sleeping worker is connected."""
    before = int(redis_client.info("stats")["total_commands_processed"])
    time.sleep(seconds)
    return int(redis_client.info("stats")["total_commands_processed"]) - before - 1  # minus our own INFO


def run_qkit(redis_url: str, database_url: str, home: Path, rate: float, seconds: float, client,
             trace: bool = False) -> dict:
    import qkit

    import latency_trace

    env = dict(os.environ, QKIT_HOME=str(home), QKIT_REDIS_URL=redis_url, QKIT_DATABASE_URL=database_url,
               QKIT_HANDLERS="noop_handlers", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    q = qkit.connect("latency", home=home, redis_url=redis_url, database_url=database_url)
    q.enqueue("stamp", {})  # the ledger and Redis are warm before the worker starts
    stamps: dict[str, Any] = {}
    trace_path = str(home / "trace.jsonl")
    if trace:
        env["QKIT_LATENCY_TRACE"] = trace_path
        latency_trace.install_producer_probes(stamps)
    command = [str(HERE / "latency_trace.py")] if trace else ["-c", _CLI]
    worker = subprocess.Popen([sys.executable, *command, "work", "--forever", "--queue", "latency"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while q.get(1).status != "completed":
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("bench: the --forever worker did not start")
            time.sleep(0.05)
        idle = idle_commands(client, 3.0)
        sent: dict[int, tuple[float, float]] = {}
        sent_ns: dict[int, dict[str, int]] = {}
        n = int(rate * seconds)
        start = time.monotonic()
        for i in range(n):
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            waits = stamps.pop("lock_waits_ms", [])
            stamps.clear()
            stamps["lock_waits_ms"] = waits
            t0, n0 = time.time(), time.perf_counter_ns()
            job_id = q.enqueue("stamp", {})
            sent[job_id] = (t0, time.time())
            sent_ns[job_id] = {**stamps, "call": n0, "return": time.perf_counter_ns()}
        deadline = time.monotonic() + 120
        while True:
            done = {j.id: j for j in q.jobs(status="completed", limit=n + 10)}
            if all(i in done for i in sent) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    from_call, from_ack = [], []
    handler_ns: dict[int, int] = {}
    for job_id, (t0, t1) in sent.items():
        result = q.get(job_id).result
        started = result["t"]
        handler_ns[job_id] = result.get("ns", 0)
        from_call.append((started - t0) * 1000)
        from_ack.append((started - t1) * 1000)
    enqueue_ms = [(t1 - t0) * 1000 for t0, t1 in sent.values()]
    q.close()
    out = {"from_enqueue_call": quantiles(from_call), "from_acknowledgment": quantiles(from_ack),
           "enqueue_call": quantiles(enqueue_ms), "idle_redis_cmds_per_3s": idle}
    if trace:
        out["trace_ms"] = latency_trace.summarise(trace_path, sent_ns, handler_ns,
                                                    stamps.get("lock_waits_ms", []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--ledger", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--no-bullmq", action="store_true")
    ap.add_argument("--trace", action="store_true", help="stamp qkit's steps in both processes (bench/latency_trace.py)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qkit-latency-") as tmp:
        redis = start_redis(Path(tmp))
        # a folder of its own: PostgreSQL runs as its own user, who cannot enter this 0700 temporary folder
        pg_dir = Path(tempfile.mkdtemp(prefix="qkit-latency-pg-")) if a.ledger == "postgres" else None
        pg = start_postgres(pg_dir) if pg_dir else None
        client = redis.client()
        try:
            database_url = pg.url if pg else f"sqlite:///{Path(tmp) / 'home' / 'ledger.sqlite3'}"
            out = {"rate": a.rate, "seconds": a.seconds, "ledger": a.ledger,
                   "qkit": run_qkit(redis.url, database_url, Path(tmp) / "home", a.rate, a.seconds, client,
                                     a.trace)}
            if not a.no_bullmq:
                out["bullmq"] = bullmq.run("latency", redis.url, a.rate, a.seconds, 1)
            out["loadavg_1m"] = os.getloadavg()[0]
            print(json.dumps(out))
        finally:
            client.close()
            redis.stop()
            if pg:
                pg.stop()
                shutil.rmtree(pg_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

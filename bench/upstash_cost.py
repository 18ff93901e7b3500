"""What 10,000 jobs cost on Upstash, and how fast they go through it; prints one JSON line.

``python bench/upstash_cost.py [--jobs 10000] [--latency-ms 5] [--profile PREFIX]``

A throw-away /usr/bin/redis-server and qkit's local Upstash REST endpoint (a
uvicorn thread of this process, ``--latency-ms`` slept before each answer, as
a network round trip would) stand in for Upstash; the unmodified
``upstash-redis`` client talks to it.  ``--jobs`` no-op jobs are enqueued with
``enqueue_many`` and drained by bursts (``q.work()``) in this process, with a
SQLite ledger in a temporary folder.  Figures:

* ``commands_per_job`` / ``requests_per_job``: Redis commands (what Upstash
  bills) and HTTP requests per finished job, from the client's counters, and
  cross-checked against what the endpoint served;
* ``usd_per_100k_jobs``: at $0.20 per 100,000 commands (pay-as-you-go, 2026);
* ``jobs_per_s``: end to end, from the first enqueue to the last job settled.

Targets (issue 3): at most 0.1 commands per job, at least 1,000 jobs/s with
5 ms of injected latency.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import qkit
from qkit.dev.servers import start_redis
from qkit.engine.queue import UPSTASH_USD_PER_100K_COMMANDS
from qkit.dev.upstash import create_app, start_in_thread

TARGET_COMMANDS_PER_JOB = 0.1
TARGET_JOBS_PER_S = 1000.0


@qkit.handler("noop", timeout=60)
def noop(payload: dict) -> None:
    """Nothing at all: the job's cost is the queue's."""
    return None


def run(jobs: int, latency_ms: float, batch: int, concurrency: int, folder: Path,
        profile: str | None = None) -> dict[str, Any]:
    """Enqueue and drain ``jobs`` no-op jobs through the endpoint; return the figures."""
    redis_server = start_redis(folder)
    token = "bench-" + secrets.token_hex(12)
    endpoint = start_in_thread(create_app(redis_server.url, token, latency_ms=latency_ms))
    q = qkit.connect("bench.upstash-cost", upstash_url=endpoint.url, upstash_token=token, home=folder,
                     database_url=f"sqlite:///{folder / 'ledger.sqlite3'}")
    served = endpoint.app.state.stats
    profiler = None
    try:
        q.ledger.init_schema()
        served.reset()
        base = q.backend.counters()
        items = [{"type": "noop", "payload": {"n": i}} for i in range(jobs)]
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        t0 = time.perf_counter()
        for start in range(0, jobs, batch):
            q.enqueue_many(items[start:start + batch])
        t_enqueued = time.perf_counter()
        bursts = []
        while True:
            summary = q.work(concurrency=concurrency)
            bursts.append(summary)
            if summary.processed == 0:
                break
        t_done = time.perf_counter()
        if profiler is not None:
            profiler.stop()
            write_profile(profiler, profile)
        counts = q.ledger.status_counts(q.name)
        if counts["completed"] != jobs:
            raise RuntimeError(f"only {counts['completed']} of {jobs} jobs completed: {counts}")
        end = q.backend.counters()
        commands, requests = end["commands"] - base["commands"], end["requests"] - base["requests"]
        cost = q.cost()
        elapsed = t_done - t0
        return {
            "bench": "upstash_cost",
            "jobs": jobs,
            "latency_ms": latency_ms,
            "enqueue_batch": batch,
            "concurrency": concurrency,
            "commands": commands,
            "requests": requests,
            "endpoint_requests": served.requests,
            "endpoint_commands": served.commands,
            "commands_per_job": round(commands / jobs, 6),
            "requests_per_job": round(requests / jobs, 6),
            "usd_per_100k_jobs": round(commands / jobs * UPSTASH_USD_PER_100K_COMMANDS, 6),
            "stats_cost": cost,
            "ledger_statements": q.ledger.statements,
            "bursts": len(bursts),
            "enqueue_s": round(t_enqueued - t0, 3),
            "drain_s": round(t_done - t_enqueued, 3),
            "seconds": round(elapsed, 3),
            "jobs_per_s": round(jobs / elapsed, 1),
            "enqueue_jobs_per_s": round(jobs / (t_enqueued - t0), 1),
            "drain_jobs_per_s": round(jobs / (t_done - t_enqueued), 1),
            "targets": {
                "commands_per_job_max": TARGET_COMMANDS_PER_JOB,
                "jobs_per_s_min": TARGET_JOBS_PER_S,
                "commands_ok": commands / jobs <= TARGET_COMMANDS_PER_JOB,
                "throughput_ok": jobs / elapsed >= TARGET_JOBS_PER_S,
            },
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        }
    finally:
        q.close()
        endpoint.stop()
        redis_server.stop()


def write_profile(profiler: Any, prefix: str) -> None:
    """Tree and flat (self time per function) text renderings of a pyinstrument session."""
    from pyinstrument.renderers import ConsoleRenderer

    session = profiler.last_session
    with open(prefix + ".txt", "w") as fh:
        fh.write(ConsoleRenderer(unicode=False, color=False, time="percent_of_total").render(session))
    with open(prefix + ".flat.txt", "w") as fh:
        fh.write(ConsoleRenderer(unicode=False, color=False, flat=True, time="percent_of_total").render(session))


def main(argv: list[str] | None = None) -> int:
    """Parse options, run once, print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--latency-ms", type=float, default=5.0, help="sleep before each endpoint answer")
    p.add_argument("--batch", type=int, default=10_000, help="items per enqueue_many call")
    p.add_argument("--concurrency", type=int, default=1, help="handler threads per burst")
    p.add_argument("--profile", default=None, help="write a pyinstrument profile to PREFIX.txt and PREFIX.flat.txt")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.batch < 1 or a.latency_ms < 0:
        p.error("--jobs and --batch must be >= 1, --latency-ms >= 0")
    folder = Path(tempfile.mkdtemp(prefix="qkit-bench-upstash-"))
    try:
        out = run(a.jobs, a.latency_ms, a.batch, a.concurrency, folder, a.profile)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""I/O-bound jobs: does ``concurrency`` overlap the waits?

    python bench/io_bound.py [--n 2000] [--sleep-ms 20] [--concurrency 1,8,32]
        [--backend embedded|redis|upstash] [--ledger sqlite|postgres] [--latency-ms MS] [--json]

Each job's handler sleeps ``--sleep-ms`` (``noop_handlers.sleep``, standing in
for a network call).  For each concurrency K the same harness as
``throughput.py`` enqueues N jobs and drains them with one burst worker
process, ``q.work(concurrency=K)``.  The ideal rate is K / sleep; one thread
can do at most 1000 / sleep-ms jobs/s (50 at 20 ms).  Prints a markdown table
(or, with ``--json``, one JSON line per K and a summary line).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import open_stack, run_once  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the I/O-bound series and print jobs/s per concurrency."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--sleep-ms", type=float, default=20.0)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--backend", choices=("embedded", "redis", "upstash"), default="embedded")
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a markdown table")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]

    stack = open_stack(a.backend, a.ledger, latency_ms=a.latency_ms, redis_url=a.redis_url,
                       database_url=a.database_url)
    rows = []
    try:
        for k in levels:
            r = run_once(stack, a.n, queue=f"io-c{k}", job_type="sleep", payload={"ms": a.sleep_ms},
                         concurrency=k, idle_s=0)
            r["ideal_jobs_per_s"] = round(k * 1000.0 / a.sleep_ms, 1)
            r["efficiency"] = round(r["drain_jobs_per_s"] / r["ideal_jobs_per_s"], 3)
            rows.append(r)
            if a.json:
                print(json.dumps(r, default=str), flush=True)
    finally:
        stack.close()
    base = rows[0]["drain_jobs_per_s"]
    rates = [r["drain_jobs_per_s"] for r in rows]
    summary = {
        "n": a.n, "sleep_ms": a.sleep_ms, "backend": a.backend, "ledger": a.ledger,
        "drain_jobs_per_s": {str(r["concurrency"]): r["drain_jobs_per_s"] for r in rows},
        "speedup": {str(r["concurrency"]): round(r["drain_jobs_per_s"] / base, 2) for r in rows},
        "scales": all(b > a_ for a_, b in zip(rates, rates[1:])),
    }
    if a.json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"I/O-bound: {a.n} jobs sleeping {a.sleep_ms:g} ms, {a.backend} + {a.ledger}, one worker process\n")
        print("| concurrency | drain jobs/s | burst jobs/s | ideal jobs/s | efficiency | speedup vs 1 "
              "| e2e jobs/s | completed | worker peak RSS MB |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['concurrency']} | {r['drain_jobs_per_s']:,.0f} | {r['burst_jobs_per_s']:,.0f} "
                  f"| {r['ideal_jobs_per_s']:,.0f} | {r['efficiency']:.0%} "
                  f"| {r['drain_jobs_per_s'] / base:.2f}x | {r['e2e_jobs_per_s']:,.0f} | {r['completed']} "
                  f"| {r['worker_peak_rss_mb']} |")
        print(f"\nscales with concurrency: {'yes' if summary['scales'] else 'NO'}")
    return 0 if summary["scales"] else 1


if __name__ == "__main__":
    sys.exit(main())

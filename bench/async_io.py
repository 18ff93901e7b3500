"""Async handlers against sync threads on the same I/O-bound work (issue 16).

    python bench/async_io.py [--n 2000] [--sleep-ms 20] [--concurrency 200] [--repeat 3]
        [--backend embedded|redis|upstash] [--ledger sqlite|postgres] [--min-rate 5000] [--json]

Each job waits ``--sleep-ms``: ``asyncio.sleep`` in an ``async def`` handler
(``noop_handlers.asleep``, on the burst's one event loop) or ``time.sleep`` in
a sync one (``noop_handlers.sleep``, on ``concurrency`` threads).  The harness
is ``throughput.py``'s: N jobs enqueued, then ONE burst worker process
``q.work(concurrency=K)``.  ``burst jobs/s`` times the burst (``q.work``) alone;
``drain jobs/s`` adds the worker process's start-up (~0.3 s, which weighs a
lot on 2,000 jobs that take ~0.3 s).  The ideal rate is K / sleep (10,000
jobs/s at 200 and 20 ms).  With ``--repeat`` the kinds alternate and the
median run counts.  Exit 1 if the async median burst rate is below
``--min-rate``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import open_stack, run_once  # noqa: E402

KINDS = {"async": "asleep", "threads": "sleep"}


def main(argv: list[str] | None = None) -> int:
    """Run both kinds ``--repeat`` times, print the medians, check the async rate."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--sleep-ms", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backend", choices=("embedded", "redis", "upstash"), default="embedded")
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--min-rate", type=float, default=5000.0, help="async burst jobs/s required (exit 1 below)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a markdown table")
    a = p.parse_args(argv)

    stack = open_stack(a.backend, a.ledger)
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    try:
        for rep in range(a.repeat):
            for kind, job_type in KINDS.items():
                r = run_once(stack, a.n, queue=f"aio-{kind}-{rep}", job_type=job_type,
                             payload={"ms": a.sleep_ms}, concurrency=a.concurrency, idle_s=0)
                r["kind"] = kind
                runs[kind].append(r)
                if a.json:
                    print(json.dumps(r, default=str), flush=True)
    finally:
        stack.close()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    summary = {"n": a.n, "sleep_ms": a.sleep_ms, "concurrency": a.concurrency, "backend": a.backend,
               "ledger": a.ledger, "repeat": a.repeat,
               "ideal_jobs_per_s": round(a.concurrency * 1000.0 / a.sleep_ms, 1),
               "loadavg_1m": [r["loadavg_1m"] for kind in KINDS for r in runs[kind]]}
    for kind in KINDS:
        summary[kind] = {"burst_jobs_per_s": median(kind, "burst_jobs_per_s"),
                         "drain_jobs_per_s": median(kind, "drain_jobs_per_s"),
                         "burst_all": [r["burst_jobs_per_s"] for r in runs[kind]],
                         "completed": [r["completed"] for r in runs[kind]],
                         "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in runs[kind])}
    ok = summary["async"]["burst_jobs_per_s"] >= a.min_rate and all(
        c == a.n for kind in KINDS for c in summary[kind]["completed"])
    summary["ok"] = ok
    if a.json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"{a.n} jobs of {a.sleep_ms:g} ms I/O at concurrency {a.concurrency}, {a.backend} + {a.ledger}, "
              f"one worker process, median of {a.repeat}\n")
        print("| handlers | burst jobs/s (median) | every run | drain jobs/s (start-up included) "
              "| ideal | worker peak RSS MB |")
        print("|---|---:|---|---:|---:|---:|")
        for kind in KINDS:
            k = summary[kind]
            print(f"| {kind} | {k['burst_jobs_per_s']:,.0f} | {', '.join(f'{x:,.0f}' for x in k['burst_all'])} "
                  f"| {k['drain_jobs_per_s']:,.0f} | {summary['ideal_jobs_per_s']:,.0f} "
                  f"| {k['worker_peak_rss_mb']} |")
        print(f"\nasync >= {a.min_rate:,.0f} jobs/s: {'yes' if ok else 'NO'} (load {summary['loadavg_1m']})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

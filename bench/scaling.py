"""The throughput figures at several N, as a markdown table.

    python bench/scaling.py [--big] [--ns 2000,20000] [--backend embedded] [--ledger sqlite] [--json]

Default N = 2,000 and 20,000; ``--big`` adds 200,000 (about a minute more on
a 2-core machine, and ~25 MB of Redis).  Each N gets fresh servers and a fresh
ledger (``throughput.open_stack``), so a run never inherits the previous one's
tables.  Redis bytes per pending job is ``used_memory`` growth after the
enqueue divided by N (the 150-byte target is stated at 100,000 pending: pass
``--ns 100000`` to measure exactly there).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import open_stack, run_once  # noqa: E402

COLUMNS = [
    ("N", "n", "{:,}"),
    ("enqueue jobs/s", "enqueue_jobs_per_s", "{:,.0f}"),
    ("drain jobs/s", "drain_jobs_per_s", "{:,.0f}"),
    ("e2e jobs/s", "e2e_jobs_per_s", "{:,.0f}"),
    ("burst jobs/s (no start-up)", "burst_jobs_per_s", "{:,.0f}"),
    ("worker start-up s", "worker_startup_s", "{:.2f}"),
    ("client Redis cmds/job", "redis_cmds_per_job", "{:.4f}"),
    ("server Redis cmds/job (incl. Lua)", "redis_server_cmds_per_job", "{:.2f}"),
    ("ledger stmts/job", "ledger_statements_per_job", "{:.4f}"),
    ("Redis bytes/pending job", "redis_bytes_per_pending_job", "{:.1f}"),
    ("worker peak RSS MB", "worker_peak_rss_mb", "{:.1f}"),
    ("idle Redis cmds", "idle_redis_cmds", "{}"),
]


def main(argv: list[str] | None = None) -> int:
    """Run throughput at each N and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="2000,20000", help="comma-separated job counts")
    p.add_argument("--big", action="store_true", help="add N = 200,000")
    p.add_argument("--backend", choices=("embedded", "redis", "upstash"), default="embedded")
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--json", action="store_true", help="also print each run as a JSON line")
    a = p.parse_args(argv)
    ns = [int(x) for x in a.ns.split(",") if x.strip()]
    if a.big and 200_000 not in ns:
        ns.append(200_000)

    rows = []
    for n in ns:
        stack = open_stack(a.backend, a.ledger, latency_ms=a.latency_ms)
        try:
            r = run_once(stack, n, concurrency=a.concurrency, idle_s=0.5)
        finally:
            stack.close()
        rows.append(r)
        if a.json:
            print(json.dumps(r, default=str), flush=True)
    print(f"\nqkit no-op jobs, {a.backend} + {a.ledger}, one worker process (concurrency {a.concurrency}), "
          f"{rows[0]['server']}, git {rows[0]['git']}\n")
    print("| " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|" + "---:|" * len(COLUMNS))
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("n/a" if v is None else fmt.format(v))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

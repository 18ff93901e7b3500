"""How long one ``GET /metrics`` scrape and one ``GET /api/queues`` take to read a ledger of N jobs.

A fresh ``QKIT_HOME`` (embedded Redis, SQLite ledger): N jobs of 4 types enqueued, half of them run by
one burst, then the collector and the overview are timed in-process (no HTTP), ``--repeat`` times.

    python bench/metrics_scrape.py --n 100000 --repeat 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import qkit
from qkit.api.metrics import scrape
from qkit.api.routes_ops import queue_rows
from qkit.backends.embedded import EmbeddedServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="qkit-metrics-bench-"))
    q = qkit.connect("bench", home=str(home), backoff_base=0)
    try:
        for start in range(0, args.n, 10_000):
            q.enqueue_many([{"type": f"t{i % 4}", "payload": {}} for i in range(start, min(args.n, start + 10_000))])
        q.work(max_jobs=args.n // 2)
        scrapes, overviews, size = [], [], 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            size = len(scrape(q.ledger, "default"))
            scrapes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            queue_rows(q.ledger, "default")
            overviews.append(time.perf_counter() - t0)
        print(f"jobs={args.n} (half completed) scrape median={statistics.median(scrapes) * 1000:.0f} ms "
              f"({size} bytes) queues median={statistics.median(overviews) * 1000:.0f} ms")
    finally:
        q.close()
        EmbeddedServer(home).stop()


if __name__ == "__main__":
    main()

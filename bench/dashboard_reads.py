"""The dashboard's ledger reads, timed on a ledger of any size (docs/http-api.md#dashboard).

    python bench/analyst_scale.py --jobs 1000000 --ledger sqlite --keep DIR   # a synthetic ledger
    python bench/dashboard_reads.py sqlite:///DIR/ledger.sqlite3

Times, ``--repeat`` times each (the mean, ms), what one view of each page reads
(:mod:`qkit.ledger.dashboard`): the overview's counts (every refresh) and its
sparkline (at most every 20 s), the newest page of ``/jobs``, the jobs list
filtered by status and by type, one job's row.  No Redis is needed.  Prints one
JSON line with the ledger's job count and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkit.ledger import Ledger, utcnow  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("database_url")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    ledger = Ledger(args.database_url)
    try:
        overview = ledger.queue_overview()
        queue = max(overview, key=lambda q: sum(q["counts"].values()))["queue"]
        newest = ledger.find_jobs(limit=1)[0]["id"]
        reads = {
            "overview_counts": lambda: ledger.queue_overview(),
            "overview_sparkline_30min": lambda: ledger.finished_per_minute(since=utcnow() - timedelta(minutes=30)),
            "jobs_newest_page": lambda: ledger.find_jobs(limit=51),
            "jobs_status_failed": lambda: ledger.find_jobs(queue=queue, status="failed", limit=51),
            "jobs_type_nomatch": lambda: ledger.find_jobs(queue=queue, type="no-such-type", limit=51),
            "job_row": lambda: ledger.job_row(newest),
        }
        out: dict[str, object] = {"jobs": sum(sum(q["counts"].values()) for q in overview),
                                  "dialect": ledger.dialect}
        for name, read in reads.items():
            read()  # warm the cache once
            started = time.perf_counter()
            for _ in range(args.repeat):
                read()
            out[f"{name}_ms"] = round((time.perf_counter() - started) / args.repeat * 1000, 1)
        out["load_avg_1m"] = round(os.getloadavg()[0], 1)
    finally:
        ledger.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

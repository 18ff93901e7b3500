"""The ledger's floor: the hot path's own SQL for N jobs, with nothing of qkit around it.

``python bench/ledger_floor.py [--n 20000] [--batch 1000] [--ledger sqlite|postgres] [--repeat 3]``

Per batch, the three transactions a job passes through, with the statements of
``qkit.ledger.hotpath`` sent as it sends them (``DriverSQL``, rows built before the clock
starts): enqueue (insert the jobs and their ``enqueued`` events; on SQLite with
``synchronous=FULL``, as an acknowledged enqueue commits), claim (select the rows,
one UPDATE for the batch, insert the attempts and ``claimed`` events) and settle
(select the fence rows, update jobs and attempts, insert ``completed`` events).
What a job costs the database and driver alone is the physical limit of an
end-to-end run on this machine (bench/README.md#profiles).  Prints one JSON line:
µs per job per transaction (median of ``--repeat``), the floor in jobs/s, the
rows and statements per job, and this process's CPU per job (on SQLite, all of it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qkit.ledger import Ledger  # noqa: E402
from qkit.ledger.hotpath import (CLAIM_JOBS, INSERT_ATTEMPT, INSERT_EVENT, INSERT_JOB, SELECT_CLAIM,  # noqa: E402
                                 SELECT_FENCE, SETTLE_ATTEMPT, SETTLE_JOB, DriverSQL)

#: rows each job writes: enqueue (job, event), claim (job update, attempt, event), settle (job, attempt, event)
ROWS_PER_JOB = 8


def one_run(url: str, n: int, batch: int) -> dict[str, float]:
    ledger = Ledger(url)
    ledger.init_schema()
    d = DriverSQL(ledger.dialect)
    now = datetime.now(timezone.utc)
    at = d.ts(now)
    spent = {"enqueue": 0.0, "claim": 0.0, "settle": 0.0}
    for start in range(0, n, batch):
        ids = list(range(1 + start, 1 + min(n, start + batch)))
        jobs = [(i, "floor", "noop", "{}", 0, 3, at, at, at, None) for i in ids]
        events = [(i, at, "enqueued", None, None) for i in ids]
        t0 = time.perf_counter()
        with ledger.durable_engine.begin() as conn:  # as Ledger.insert_jobs: synchronous=FULL on SQLite
            d.run(conn, INSERT_JOB, jobs)
            d.run(conn, INSERT_EVENT, events)
        spent["enqueue"] += time.perf_counter() - t0

        attempts = [(i, 0, 1, "w-floor", at) for i in ids]
        claimed = [(i, at, "claimed", "w-floor", '{"attempt":1}') for i in ids]
        t0 = time.perf_counter()
        with ledger.engine.begin() as conn:
            d.select_ids(conn, SELECT_CLAIM, ids, lock=True)
            conn.exec_driver_sql(d.with_ids(CLAIM_JOBS), (at, at, d.ids_arg(ids)))
            d.run(conn, INSERT_ATTEMPT, attempts)
            d.run(conn, INSERT_EVENT, claimed)
        spent["claim"] += time.perf_counter() - t0

        done = [("completed", None, None, at, None, at, i) for i in ids]
        closed = [("completed", at, 0.01, None, None, None, None, i, 0, 1) for i in ids]
        completed = [(i, at, "completed", "w-floor", '{"attempt":1,"duration_ms":0.010}') for i in ids]
        t0 = time.perf_counter()
        with ledger.engine.begin() as conn:
            d.select_ids(conn, SELECT_FENCE, ids, lock=True)
            d.run(conn, SETTLE_JOB, done)
            d.run(conn, SETTLE_ATTEMPT, closed)
            d.run(conn, INSERT_EVENT, completed)
        spent["settle"] += time.perf_counter() - t0
    ledger.engine.dispose()
    return {k: v / n * 1e6 for k, v in spent.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=1_000)
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="qkit-floor-"))
    postgres = None
    runs = []
    cpu0 = time.process_time()
    try:
        if a.ledger == "postgres":
            from qkit.dev.servers import start_postgres

            pg_dir = Path(tempfile.mkdtemp(prefix="qkit-floor-pg-"))  # its own folder: start_postgres hands it over
            postgres = start_postgres(pg_dir)
        for r in range(a.repeat):
            url = postgres.database(f"floor_{r}") if postgres else f"sqlite:///{tmp / f'floor-{r}.sqlite3'}"
            runs.append(one_run(url, a.n, a.batch))
    finally:
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    per = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    total = sum(per.values())
    print(json.dumps({
        "ledger": a.ledger, "n": a.n, "batch": a.batch, "repeat": a.repeat,
        "us_per_job": per, "us_per_job_total": round(total, 2), "floor_jobs_per_s": round(1e6 / total),
        "rows_per_job": ROWS_PER_JOB, "statements_per_job": round(11 / a.batch, 4), "commits_per_job": 3 / a.batch,
        "this_process_cpu_us_per_job": round((time.process_time() - cpu0) / (a.n * a.repeat) * 1e6, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Analyst scale: the figures of retry_analysis and queue_monitor from a ledger of a million jobs.

    python bench/analyst_scale.py --jobs 1000000 --ledger sqlite
    python bench/analyst_scale.py --jobs 1000000 --ledger postgres

Builds a synthetic ledger (no Redis needed: the notebooks' figures read only
the ledger) with bulk inserts (``executemany`` on SQLite, ``COPY`` on
PostgreSQL): ``--jobs`` jobs of four types and three priorities, about three
attempts per job (1-5, the fifth may dead-letter the job), the events a
worker writes (enqueued, claimed, retry_scheduled with its back-off,
completed, failed + dead), 0.5% of the jobs still pending, and an early spike
(a fifth of the jobs enqueued in the first five minutes of six hours).  Then
it times, in a fresh process, every frame and figure the two notebooks draw
(qkit.analysis.frames -> qkit.analysis.plots -> PNG) and reports that process's peak RSS.
Prints one JSON line; ``--keep DIR`` keeps the SQLite file there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = np.array(["ai_text_generation", "ai_image_generation", "web_scraping", "scheduled_publish"])
T0 = datetime(2025, 1, 6, 8, 0, tzinfo=timezone.utc).timestamp()
SPAN_S = 6 * 3600
CHUNK = 100_000


def _iso(seconds: np.ndarray, sep: str = " ") -> np.ndarray:
    """Epoch seconds -> 'YYYY-MM-DD HH:MM:SS.ffffff' (SQLAlchemy's SQLite storage; PostgreSQL reads it as UTC)."""
    us = np.round(seconds * 1e6).astype("int64").astype("datetime64[us]")
    out = np.datetime_as_string(us, unit="us")
    return np.char.replace(out, "T", sep)


def chunks(n_jobs: int, seed: int) -> Iterator[dict[str, list[tuple]]]:
    """Rows of jobs, job_attempts and job_events, CHUNK jobs at a time (ids from 1)."""
    rng = np.random.default_rng(seed)
    att_id = ev_id = 0
    for a in range(1, n_jobs + 1, CHUNK):
        ids = np.arange(a, min(n_jobs + 1, a + CHUNK))
        n = len(ids)
        t_idx = rng.integers(0, 4, n)
        prio = rng.choice([0, 5, 10], n, p=[0.7, 0.2, 0.1])
        spike = rng.random(n) < 0.2
        created = T0 + np.where(spike, rng.random(n) * 300, rng.random(n) * SPAN_S)
        k = rng.choice([1, 2, 3, 4, 5], n, p=[0.15, 0.2, 0.3, 0.2, 0.15])
        pending = ids > n_jobs * 0.995
        k = np.where(pending, 0, k)
        failed = (k == 5) & (rng.random(n) < 0.5)
        status = np.where(pending, "pending", np.where(failed, "failed", "completed"))
        # attempts: one row per (job, attempt)
        job_of = np.repeat(np.arange(n), k)
        att_no = np.arange(len(job_of)) - np.repeat(np.cumsum(k) - k, k) + 1
        scale = np.array([400.0, 2500.0, 150.0, 40.0])[t_idx[job_of]]
        dur_s = rng.lognormal(np.log(scale), 0.6) / 1000
        wait = rng.exponential(np.where(prio[job_of] > 0, 0.5, 3.0))
        delay = np.where(att_no > 1, rng.random(len(job_of)) * np.minimum(300, 2.0 ** (att_no - 1)), 0.0)
        csum = np.concatenate([[0.0], np.cumsum(wait + delay + dur_s)])
        base = csum[np.cumsum(k) - k]  # the running sum before each job's first attempt
        finished = created[job_of] + csum[1:] - base[job_of]
        started = finished - dur_s
        last = att_no == k[job_of]
        outcome = np.where(last & ~failed[job_of], "completed", "failed")
        next_delay = np.append(delay[1:], 0.0)
        first_start = np.full(n, np.nan)
        first_start[job_of[att_no == 1]] = started[att_no == 1]
        job_finish = np.full(n, np.nan)
        job_finish[job_of[last]] = finished[last]
        c_iso, s_iso, f_iso = _iso(created), _iso(started), _iso(finished)
        fs_iso = np.where(np.isnan(first_start), None, _iso(np.nan_to_num(first_start)))
        jf_iso = np.where(np.isnan(job_finish), None, _iso(np.nan_to_num(job_finish)))
        jobs_rows = [(int(i), "default", TYPES[t], '{"seed": %d, "seq": %d}' % (1 + (i > n_jobs // 2), i), st,
                      int(p), int(kk), 5, None if st != "failed" else "SimulatedFailure: upstream error",
                      ci, ci, jf or ci, fs, jf, 0)
                     for i, t, st, p, kk, ci, fs, jf in zip(ids.tolist(), t_idx.tolist(), status.tolist(),
                                                           prio.tolist(), k.tolist(), c_iso.tolist(),
                                                           fs_iso.tolist(), jf_iso.tolist())]
        att_rows = []
        ev_rows = []
        for j, an, si, fi, du, oc, is_last, nd in zip(job_of.tolist(), att_no.tolist(), s_iso.tolist(),
                                                      f_iso.tolist(), (dur_s * 1000).tolist(), outcome.tolist(),
                                                      last.tolist(), next_delay.tolist()):
            att_id += 1
            jid = a + j
            att_rows.append((att_id, jid, 0, an, "bench-worker", si, fi, du, oc,
                             None if oc == "completed" else "SimulatedFailure: upstream error", None,
                             None if oc == "completed" else "SimulatedFailure: upstream error"))
            ev_rows.append((jid, si, "claimed", '{"attempt": %d}' % an))
            if is_last and oc == "completed":
                ev_rows.append((jid, fi, "completed", '{"attempt": %d, "duration_ms": %.3f}' % (an, du)))
            elif is_last:
                ev_rows.append((jid, fi, "failed", '{"attempt": %d, "outcome": "failed"}' % an))
                ev_rows.append((jid, fi, "dead", None))
            else:
                ev_rows.append((jid, fi, "retry_scheduled",
                                '{"attempt": %d, "outcome": "failed", "delay_s": %.3f}' % (an, nd)))
        ev_rows += [(int(i), ci, "enqueued", None) for i, ci in zip(ids.tolist(), c_iso.tolist())]
        events = []
        for row in ev_rows:
            ev_id += 1
            events.append((ev_id, *row[:3], "bench-worker", row[3]))
        yield {"jobs": jobs_rows, "job_attempts": att_rows, "job_events": events}


COLUMNS = {
    "jobs": ("id", "queue", "type", "payload", "status", "priority", "attempts", "max_attempts", "error",
             "run_at", "created_at", "updated_at", "started_at", "finished_at", "epoch"),
    "job_attempts": ("id", "job_id", "epoch", "attempt", "worker", "started_at", "finished_at", "duration_ms",
                     "outcome", "error", "traceback", "fingerprint"),
    "job_events": ("id", "job_id", "at", "event", "worker", "detail"),
}


def build(url: str, n_jobs: int, seed: int) -> dict[str, Any]:
    """Create the tables (qkit's schema) and bulk-load the synthetic ledger; returns counts and seconds."""
    from sqlalchemy.schema import CreateIndex

    from qkit.ledger import Ledger, job_events

    t0 = time.perf_counter()
    ledger = Ledger(url)
    ledger.init_schema()
    counts = {name: 0 for name in COLUMNS}
    raw = ledger.engine.raw_connection()
    try:
        driver = raw.driver_connection
        if ledger.dialect == "sqlite":
            driver.execute("PRAGMA synchronous=OFF")
            driver.execute("DROP INDEX ix_events_moves")  # built once after the load (v6; SQLite only): faster
            for part in chunks(n_jobs, seed):
                driver.execute("BEGIN")
                for table, rows in part.items():
                    cols = COLUMNS[table]
                    driver.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                                       f"({', '.join('?' * len(cols))})", rows)
                    counts[table] += len(rows)
                driver.execute("COMMIT")
            driver.execute("PRAGMA threads=2")
            driver.execute(next(str(CreateIndex(i).compile(dialect=ledger.engine.dialect))
                                for i in job_events.indexes if i.name == "ix_events_moves"))
            driver.execute("ANALYZE")
        else:
            with driver.cursor() as cur:
                for part in chunks(n_jobs, seed):
                    for table, rows in part.items():
                        cols = COLUMNS[table]
                        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                            for row in rows:
                                copy.write_row(row)
                        counts[table] += len(rows)
                    driver.commit()
                for table in COLUMNS:
                    cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                f"(SELECT max(id) FROM {table}))")
                driver.commit()
                driver.autocommit = True
                cur.execute("ANALYZE")
    finally:
        raw.close()
        ledger.close()
    return {**counts, "build_s": round(time.perf_counter() - t0, 1)}


def _peak_rss_mib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the process that forked us)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure(url: str) -> dict[str, Any]:
    """Time the frames and figures each notebook draws, as it draws them (run in a fresh process)."""
    import io
    from types import SimpleNamespace

    t_import = time.perf_counter()
    from qkit.analysis import frames, plots
    from qkit.ledger import Ledger

    imported = time.perf_counter() - t_import
    q = SimpleNamespace(name="default", ledger=Ledger(url))

    def retry_summary() -> list[Any]:
        summary = frames.type_summary(q)  # one query pair: table, success rates, box plots, "does a retry help?"
        return [plots.success_rate(summary), plots.exec_time(summary.attrs["exec_times"]),
                plots.attempt_outcomes(summary.attrs["attempt_outcomes"])]

    notebooks = {
        "retry_analysis": {
            "retry_distribution": lambda: [plots.retry_distribution(frames.retry_distribution(q))],
            "type_summary (3 figures)": retry_summary,
        },
        "queue_monitor": {
            "queue_depth": lambda: [plots.queue_depth(frames.queue_depth(q))],
            "throughput": lambda: [plots.throughput(frames.throughput(q))],
            "wait_times": lambda: [plots.wait_times(frames.wait_times(q))],
            "waiting": lambda: [frames.waiting(q)],
            "runs": lambda: [plots.runs(frames.runs(q))],
        },
    }
    out: dict[str, Any] = {"import_s": round(imported, 1)}
    total = 0.0
    for name, steps in notebooks.items():
        timings = {}
        for step_name, step in steps.items():
            t = time.perf_counter()
            for fig in step():
                if hasattr(fig, "savefig"):
                    fig.savefig(io.BytesIO(), format="png", dpi=100)
            timings[step_name] = round(time.perf_counter() - t, 2)
        out[f"{name}_s"] = round(sum(timings.values()), 1)
        out[f"{name}_steps_s"] = timings
        total += sum(timings.values())
    q.ledger.close()
    return {"figures_s": round(total, 1), **out, "peak_rss_mib": _peak_rss_mib()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, default=None, help="folder for the SQLite ledger (kept)")
    p.add_argument("--measure-only", metavar="URL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_only:
        print(json.dumps(measure(args.measure_only)))
        return 0
    with tempfile.TemporaryDirectory(prefix="qkit-analyst-") as tmp:
        pg = None
        if args.ledger == "postgres":
            from qkit.dev.servers import start_postgres

            os.chmod(tmp, 0o711)  # initdb runs as user postgres, under this folder
            pg = start_postgres(Path(tmp) / "pg")
            url = pg.database("analyst")
        else:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            db = folder / "ledger.sqlite3"
            db.unlink(missing_ok=True)
            url = f"sqlite:///{db}"
        try:
            built = build(url, args.jobs, args.seed)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            out = subprocess.run([sys.executable, __file__, "--measure-only", url], env=env, check=True,
                                 capture_output=True, text=True).stdout
            result = {"ledger": args.ledger, "jobs": args.jobs, **built, **json.loads(out.strip().splitlines()[-1]),
                      "loadavg_1m": round(os.getloadavg()[0], 1)}
        finally:
            if pg is not None:
                pg.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job (docs/architecture.md#entry-points-what-a-user-runs): ``python -m qkit.mainjob``.

On a fresh clone, on the embedded default:

1. set up: create the ledger tables (``qkit.connect`` does) and start the embedded Redis;
2. enqueue a seeded batch through ``notebooks/enqueue_batch.ipynb`` (papermill);
3. run scheduled worker bursts (:mod:`qkit.runs.runner`, so each leaves its executed
   notebook in ``scheduled/runs/``) until the batch is drained, sleeping between
   bursts until the next retry is due (the earliest pending ``run_at`` in the ledger);
4. execute ``notebooks/retry_analysis.ipynb`` on this batch and render it to
   ``reports/<UTC date>/<UTC time>-seed<seed>/retry_analysis.html`` with its figures
   embedded, beside the executed notebooks and the worker runs rendered as HTML
   (:mod:`qkit.runs.reports`), and list it in ``reports/index.html`` (newest first).

It prints where the report is.  The defaults keep it well under two minutes:
200 jobs, 30% failing attempts, a few milliseconds per job, and a back-off base
of 0.5 s (``QKIT_BACKOFF_BASE``, unless set).  Exit status 0, or 1 with one line
on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from qkit.model import STATUSES
from qkit.runs.reports import render_html  # noqa: F401 - the report renderer, where it used to live

DEFAULTS = {"n_jobs": 200, "fail_rate": 0.3, "latency_ms": 3, "seed": 42, "backoff_base": "0.5"}


def drain(q: Any, queue: str, *, total: int, deadline: float, runs_dir: Path | None = None,
          say: Any = print) -> list[Any]:
    """Scheduled bursts until nothing is pending or processing; returns their run records."""
    from tqdm import tqdm

    from qkit.analysis import frames
    from qkit.runs.runner import LockBusy, run_worker

    records = []
    tqdm.monitor_interval = 0  # no monitor thread: the runner forks papermill
    with tqdm(total=total, unit="job", desc="draining", file=sys.stdout, leave=True) as bar:
        while True:
            stats = q.ledger.status_counts(queue)
            bar.n = min(total, stats["completed"] + stats["failed"] + stats["cancelled"])
            bar.refresh()
            if stats["pending"] + stats["processing"] == 0:
                return records
            if q.ledger.is_paused(queue):  # its bursts would claim nothing until the deadline
                raise RuntimeError(f"queue {queue} is paused: resume it first (qkit resume --queue {queue})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the queue did not drain in time ({stats['pending']} pending, "
                                   f"{stats['processing']} processing)")
            if stats["due"] == 0:
                # nothing due: sleep until the next retry is (a job "processing" with nothing pending
                # holds a lease that must expire first: poll)
                due = frames.next_due(q)
                wait = 1.0 if due is None else (due - datetime.now(timezone.utc)).total_seconds()
                time.sleep(min(max(wait, 0.0) + 0.05, 5.0))
                continue
            try:
                rec = run_worker(queue=queue, max_seconds=60, runs_dir=runs_dir)
            except LockBusy:
                time.sleep(1.0)  # a scheduled run of cron or systemd is on it
                continue
            records.append(rec)
            if rec.status != "ok":
                raise RuntimeError(f"worker burst {rec.run_id} {rec.status}: {rec.error} (see {rec.output})")


def run(*, queue: str = "default", n_jobs: int = DEFAULTS["n_jobs"], fail_rate: float = DEFAULTS["fail_rate"],
        latency_ms: int = DEFAULTS["latency_ms"], seed: int = DEFAULTS["seed"], reports: Path | None = None,
        runs_dir: Path | None = None, timeout: float = 600.0) -> Path:
    """The whole main job; returns the path of the HTML report.

    ``reports`` (default ``reports/``) receives this run's folder (executed
    notebooks, the report, the worker runs as HTML) and the index;
    ``runs_dir`` (default ``scheduled/runs/``) the worker runs' logs.
    """
    import qkit
    from qkit.analysis.notebook_helpers import read_records
    from qkit.runs.reports import execute, render_runs, report_dir, write_index, write_meta
    from qkit.runs.runner import child_env, repo_root, resolve_home

    t0 = time.monotonic()
    root = repo_root()
    home = resolve_home()
    os.environ.setdefault("QKIT_BACKOFF_BASE", DEFAULTS["backoff_base"])
    # the kernels papermill starts from here: same state, this checkout's qkit, headless plots
    os.environ.update(child_env(home))
    reports = reports or root / "reports"
    notebooks = root / "notebooks"
    print(f"qkit main job: QKIT_HOME={home}")
    started = datetime.now(timezone.utc)
    folder = report_dir(reports, f"seed{seed}", started)
    with qkit.connect(queue=queue) as q:
        q.backend.ping()
        print(f"  ledger {q.ledger.describe()}, redis {q.backend.describe()}, "
              f"back-off base {q.settings.backoff_base:g} s")
        executed = folder / "enqueue_batch.ipynb"
        batch = {"seed": seed, "n_jobs": n_jobs, "fail_rate": fail_rate, "latency_ms": latency_ms}
        execute(notebooks / "enqueue_batch.ipynb", executed, {"job_type": "mixed", **batch, "queue": queue})
        ids = read_records(executed).get("job_ids") or []
        shown = executed.relative_to(root) if executed.is_relative_to(root) else executed
        print(f"  enqueued {len(ids)} jobs (notebooks/enqueue_batch.ipynb -> {shown})")
        counts = q.ledger.status_counts(queue)
        records = drain(q, queue, total=sum(counts[k] for k in STATUSES),
                        deadline=t0 + timeout, runs_dir=runs_dir)
        from qkit.analysis import frames

        done = frames.jobs(q, since=started)["status"].value_counts()
        print(f"  drained in {len(records)} scheduled burst(s): this batch {done.get('completed', 0)} completed, "
              f"{done.get('failed', 0)} dead-lettered; run logs in scheduled/runs/")
    analysis = folder / "retry_analysis.ipynb"
    execute(notebooks / "retry_analysis.ipynb", analysis, {"queue": queue, "since": started.isoformat()})
    html = folder / "retry_analysis.html"
    size = render_html(analysis, html)
    write_meta(folder, {"kind": "main job", "created_at": started.isoformat(), "queue": queue, "batch": batch,
                        "job_ids": [ids[0], ids[-1]] if ids else [], "title": "retry analysis",
                        "report": html.name, "notebooks": [executed.name, analysis.name],
                        "runs": render_runs(records, folder)})
    index = write_index(reports)
    print(f"  report: {html} ({size / 1024:.0f} KiB), in {time.monotonic() - t0:.0f} s; all reports: {index}")
    return html


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qkit.mainjob",
        description="Enqueue a seeded batch (notebooks/enqueue_batch.ipynb), run scheduled worker bursts until "
                    "it drains, and render notebooks/retry_analysis.ipynb to reports/<date>/<time>-seed<seed>/, "
                    "listed in reports/index.html.")
    p.add_argument("--queue", default="default", help="queue to use (default: default)")
    p.add_argument("--n-jobs", type=int, default=DEFAULTS["n_jobs"], help="jobs in the batch (default: 200)")
    p.add_argument("--fail-rate", type=float, default=DEFAULTS["fail_rate"],
                   help="chance that an attempt fails, 0..1 (default: 0.3)")
    p.add_argument("--latency-ms", type=int, default=DEFAULTS["latency_ms"],
                   help="typical handler latency in ms (default: 3)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="batch seed (default: 42)")
    p.add_argument("--reports", type=Path, default=None, help="output folder (default: reports/)")
    args = p.parse_args(argv)
    try:
        run(queue=args.queue, n_jobs=args.n_jobs, fail_rate=args.fail_rate, latency_ms=args.latency_ms,
            seed=args.seed, reports=args.reports)
    except KeyboardInterrupt:
        print("qkit main job: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; QKIT_DEBUG=1 for the traceback
        if os.environ.get("QKIT_DEBUG"):
            raise
        from qkit.config import redact

        first = str(exc).strip().splitlines()
        print(f"qkit main job: {type(exc).__name__}: {redact(first[-1] if first else '')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job (docs/architecture.md#entry-points-what-a-user-runs): ``python -m qkit.mainjob``.

On a fresh clone, on the embedded default:

1. set up: create the ledger tables (``qkit.connect`` does) and start the embedded Redis;
2. enqueue a seeded batch through ``notebooks/enqueue_batch.ipynb`` (papermill);
3. run scheduled worker bursts (:mod:`qkit.scheduled`, so each leaves its executed
   notebook in ``scheduled/runs/``) until the batch is drained, sleeping between
   bursts until the next retry is due (the earliest pending ``run_at`` in the ledger);
4. execute ``notebooks/retry_analysis.ipynb`` on this batch and render it to
   ``reports/retry_analysis.html`` with its figures embedded.

It prints where the report is.  The defaults keep it well under two minutes:
200 jobs, 30% failing attempts, a few milliseconds per job, and a back-off base
of 0.5 s (``QKIT_BACKOFF_BASE``, unless set).  Exit status 0, or 1 with one line
on stderr.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

DEFAULTS = {"n_jobs": 200, "fail_rate": 0.3, "latency_ms": 3, "seed": 42, "backoff_base": "0.5"}


def _execute(notebook: Path, output: Path, parameters: dict[str, Any]) -> None:
    """Run a notebook through papermill (kernel python3 on this interpreter); its log goes beside the output."""
    from qkit.scheduled import first_error, log_error, papermill_command

    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.with_name(output.name + ".log")
    with open(log, "wb") as fh:
        rc = subprocess.run(papermill_command(notebook, output, parameters), stdin=subprocess.DEVNULL, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        why = first_error(output) or log_error(log) or f"papermill exited with status {rc}"
        raise RuntimeError(f"{notebook.name} failed: {why} (see {output} and {log.name})")


def render_html(executed: Path, html: Path) -> int:
    """Render an executed notebook to standalone HTML (code hidden, figures embedded, with alt text).

    Returns the size of the HTML file in bytes.
    """
    import nbformat
    from nbconvert import HTMLExporter

    from qkit.notebook import RECORD_MIME

    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:  # records are for programs (read_records), not for readers
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if RECORD_MIME not in o.get("data", {})]
    exporter = HTMLExporter(template_name="classic", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    html.write_text(body, encoding="utf-8")
    return html.stat().st_size


def drain(q: Any, queue: str, *, total: int, deadline: float, runs_dir: Path | None = None,
          say: Any = print) -> list[Any]:
    """Scheduled bursts until nothing is pending or processing; returns their run records."""
    from tqdm import tqdm

    from qkit import frames
    from qkit.scheduled import LockBusy, run_worker

    records = []
    tqdm.monitor_interval = 0  # no monitor thread: the runner forks papermill
    with tqdm(total=total, unit="job", desc="draining", file=sys.stdout, leave=True) as bar:
        while True:
            stats = q.ledger.status_counts(queue)
            bar.n = min(total, stats["completed"] + stats["failed"])
            bar.refresh()
            if stats["pending"] + stats["processing"] == 0:
                return records
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

    ``reports`` (default ``reports/``) receives the executed notebooks and the
    report; ``runs_dir`` (default ``scheduled/runs/``) the worker runs' logs.
    """
    import qkit
    from qkit.notebook import read_records
    from qkit.scheduled import child_env, repo_root, resolve_home

    t0 = time.monotonic()
    root = repo_root()
    home = resolve_home()
    os.environ.setdefault("QKIT_BACKOFF_BASE", DEFAULTS["backoff_base"])
    # the kernels papermill starts from here: same state, this checkout's qkit, headless plots
    os.environ.update(child_env(home))
    reports = reports or root / "reports"
    notebooks = root / "notebooks"
    print(f"qkit main job: QKIT_HOME={home}")
    with qkit.connect(queue=queue) as q:
        q.backend.ping()
        print(f"  ledger {q.ledger.describe()}, redis {q.backend.describe()}, "
              f"back-off base {q.settings.backoff_base:g} s")
        started = datetime.now(timezone.utc)
        executed = reports / "enqueue_batch.ipynb"
        _execute(notebooks / "enqueue_batch.ipynb", executed,
                 {"job_type": "mixed", "n_jobs": n_jobs, "fail_rate": fail_rate, "latency_ms": latency_ms,
                  "seed": seed, "queue": queue})
        ids = read_records(executed).get("job_ids") or []
        shown = executed.relative_to(root) if executed.is_relative_to(root) else executed
        print(f"  enqueued {len(ids)} jobs (notebooks/enqueue_batch.ipynb -> {shown})")
        counts = q.ledger.status_counts(queue)
        records = drain(q, queue, total=sum(counts[k] for k in ("pending", "processing", "completed", "failed")),
                        deadline=t0 + timeout, runs_dir=runs_dir)
        from qkit import frames

        batch = frames.jobs(q, since=started)["status"].value_counts()
        print(f"  drained in {len(records)} scheduled burst(s): this batch {batch.get('completed', 0)} completed, "
              f"{batch.get('failed', 0)} dead-lettered; run logs in scheduled/runs/")
    analysis = reports / "retry_analysis.ipynb"
    _execute(notebooks / "retry_analysis.ipynb", analysis, {"queue": queue, "since": started.isoformat()})
    html = reports / "retry_analysis.html"
    size = render_html(analysis, html)
    print(f"  report: {html} ({size / 1024:.0f} KiB), in {time.monotonic() - t0:.0f} s")
    return html


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qkit.mainjob",
        description="Enqueue a seeded batch (notebooks/enqueue_batch.ipynb), run scheduled worker bursts until "
                    "it drains, and render notebooks/retry_analysis.ipynb to reports/retry_analysis.html.")
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

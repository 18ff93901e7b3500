"""The record of one scheduled run: its ``worker_runs`` row, and the copies made from it.

The runner (:mod:`qkit.runs.runner`) creates the row before papermill starts
(:func:`open_record`: trigger ``papermill``, status ``running``, the run's id in
the indexed ``run_id`` column, the runner's facts in ``params.runner``); the
notebook's burst continues that row (:meth:`qkit.ledger.Ledger.start_run`, in :mod:`qkit.ledger.runs`);
:func:`close_record` writes the runner's verdict into it, found by ``run_id``,
and reads the counts back.  :func:`write_copies` then writes the sidecar
``<output>.json`` and ``metadata.qkit`` of the executed notebook from the
record, for reading a run without the ledger (they also say when the ledger
could not be reached: ``ledger_error``).  See docs/architecture.md, "Scheduled runs".
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

#: what the runner (not the burst) knows of a run: kept in ``params.runner`` of the run's row
RUNNER_FIELDS = ("status", "exit_code", "papermill_exit", "error", "duration_s", "notebook", "output", "log",
                 "parameters", "host", "pid")
SIDECAR_FIELDS = ("run_id", "queue", "status", "exit_code", "papermill_exit", "error", "started_at",
                  "finished_at", "duration_s", "processed", "completed", "retried", "failed", "worker_run_ids",
                  "notebook", "output", "log", "parameters", "host", "pid", "ledger_error")


@dataclass
class RunRecord:
    """What one scheduled run did; saved as the ``<output>.json`` sidecar."""

    run_id: str
    queue: str
    status: str = "error"
    exit_code: int = 1  # a run not yet classified has failed (qkit.runs.runner.EXIT_FAILED)
    papermill_exit: int | None = None
    error: str | None = None
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0
    processed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    worker_run_ids: list[int] = field(default_factory=list)
    notebook: str = ""
    output: str = ""
    log: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    host: str = field(default_factory=lambda: socket.gethostname())
    pid: int = field(default_factory=os.getpid)
    ledger_error: str | None = None

    @property
    def sidecar(self) -> Path:
        return Path(self.output + ".json")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """A one-line summary for the terminal or a cron mail."""
        what = f"{self.processed} job(s) processed" if self.worker_run_ids else "no burst recorded"
        err = f": {self.error}" if self.error and self.status != "ok" else ""
        return f"{self.status}{err} - run {self.run_id}, {what} in {self.duration_s:.1f} s -> {self.output}"


def open_record(rec: RunRecord, home: Path) -> None:
    """Create the run's row (status ``running``) before papermill starts; a failure goes to ``rec.ledger_error``."""
    _with_ledger(rec, home, _open_record)


def close_record(rec: RunRecord, home: Path) -> None:
    """Write the verdict into the run's row and fill ``rec`` from it; a failure goes to ``rec.ledger_error``."""
    _with_ledger(rec, home, _close_record)


def write_copies(rec: RunRecord) -> None:
    """The record's copies: ``metadata.qkit`` of the executed notebook, and the sidecar."""
    _stamp_notebook(rec)
    write_sidecar(rec)


def _with_ledger(rec: RunRecord, home: Path, step: Any) -> None:
    """Run ``step(rec, ledger)`` on the run's ledger; a failure is kept in ``rec.ledger_error``, not raised."""
    from qkit.config import redact, settings
    from qkit.ledger import Ledger

    try:
        ledger = Ledger(settings(home=home).database_url)
        try:
            ledger.init_schema()
            step(rec, ledger)
        finally:
            ledger.close()
    except Exception as exc:  # noqa: BLE001 - the run goes on; the sidecar says what the ledger did not get
        rec.ledger_error = redact(f"{type(exc).__name__}: {exc}")[:500]


def _runner_name() -> str:
    return f"runner-{socket.gethostname().split('.')[0][:24]}-{os.getpid()}"


def _runner_facts(rec: RunRecord, **override: Any) -> dict[str, Any]:
    return {**{k: getattr(rec, k) for k in RUNNER_FIELDS}, **override}


def _open_record(rec: RunRecord, ledger: Any) -> None:
    """Create the run's ``worker_runs`` row (status ``running``) before papermill starts."""
    ledger.open_scheduled_run(_runner_name(), rec.queue, datetime.fromisoformat(rec.started_at), rec.run_id,
                              _runner_facts(rec, status="running", exit_code=None))


def _close_record(rec: RunRecord, ledger: Any) -> None:
    """Write the runner's verdict into the run's row(s), found by ``run_id``, and read the counts back.

    One row in the normal case: the runner's, continued by the notebook's
    burst.  A notebook that runs more than one burst adds a row per further
    burst (same ``run_id``); one that never reached ``q.work`` leaves the
    runner's row alone; a row the runner could not create at the start is
    created now.
    """
    row_status = {"ok": "ok", "timeout": "interrupted", "interrupted": "interrupted"}.get(rec.status, "failed")
    error = None if rec.status == "ok" else f"scheduled run {rec.status}: {rec.error}"
    rows = ledger.close_scheduled_run(_runner_name(), rec.queue, datetime.fromisoformat(rec.started_at), rec.run_id,
                                      _runner_facts(rec), ok=rec.status == "ok", status=row_status, error=error,
                                      finished_at=datetime.fromisoformat(rec.finished_at))
    rec.worker_run_ids = [int(r["id"]) for r in rows]
    for key in ("processed", "completed", "retried", "failed"):
        setattr(rec, key, sum(int(r[key] or 0) for r in rows))


def _stamp_notebook(rec: RunRecord) -> None:
    """Copy the record into the executed notebook's ``metadata.qkit`` (if papermill wrote one)."""
    try:
        import nbformat

        nb = nbformat.read(rec.output, as_version=4)
        nb.metadata["qkit"] = {k: v for k, v in rec.to_dict().items() if k not in ("host", "pid")}
        nbformat.write(nb, rec.output)
    except Exception:  # noqa: BLE001 - no (readable) output notebook: the sidecar still says why
        pass


def write_sidecar(rec: RunRecord) -> Path:
    """Write ``<output>.json`` atomically."""
    path = rec.sidecar
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rec.to_dict(), indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_sidecars(runs_dir: str | os.PathLike[str]) -> Any:
    """One row per scheduled run recorded under ``runs_dir`` (a pandas DataFrame, oldest first).

    Columns are the :class:`RunRecord` fields, with ``status`` renamed
    ``run_status`` and ``duration_s`` renamed ``run_duration_s`` (so they
    can sit next to ``worker_runs`` columns), times as datetime64[UTC].
    """
    import pandas as pd

    folder = Path(runs_dir)
    rows = []
    if folder.is_dir():
        for path in sorted(folder.glob("**/*.ipynb.json")):
            try:
                rows.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
    df = pd.DataFrame(rows, columns=list(SIDECAR_FIELDS))
    df = df.rename(columns={"status": "run_status", "duration_s": "run_duration_s"})
    for col in ("started_at", "finished_at"):
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    return df.sort_values("started_at", kind="stable").reset_index(drop=True)

"""Debug one job: its ledger rows, events and tracebacks, and one in-process re-run.

:func:`rerun` calls the job's registered handler with the job's payload under
:func:`qkit.engine.handlers.run_to_end` (so ``qkit.current_job()`` answers as in
a worker), in the calling process and thread (an ``async def`` handler on an
event loop of its own), without a lease, a timeout or
any write to the ledger or Redis.  Set a ``breakpoint()`` in the handler, or
call it with ``raise_errors=True`` and use ``%debug``, to step into it.  By
default it replays the job's last recorded attempt number, so the simulated
handlers (deterministic per job id and attempt) fail again the same way.
"""
from __future__ import annotations

import os
import socket
import time
import traceback as tb_mod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from qkit.errors import NotFound, QkitError
from qkit.engine.handlers import JobContext, get_handler, import_handler_modules, run_to_end

if TYPE_CHECKING:
    from qkit.engine.queue import Queue

#: the job debug_job enqueues on an empty queue: fails on its only attempt, so it has a traceback
DEMO_JOB = {"type": "web_scraping", "payload": {"url": "https://example.org/debug-demo",
                                               "simulate": {"fail_rate": 1.0, "latency_ms": 1}},
            "max_attempts": 1}


@dataclass
class Rerun:
    """What one in-process re-run of a handler did."""

    job_id: int
    type: str
    attempt: int
    ok: bool
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    duration_ms: float = 0.0
    exception: BaseException | None = None
    #: the (fraction, note) reports the handler made with ``current_job().progress`` during the re-run
    progress: list[tuple[float, str | None]] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """One row: job_id, type, attempt, ok, duration_ms, result, error, and the last progress report."""
        last = self.progress[-1] if self.progress else (None, None)
        return pd.DataFrame([{**{k: getattr(self, k) for k in
                                 ("job_id", "type", "attempt", "ok", "duration_ms", "result", "error")},
                              "progress": last[0], "progress_note": last[1]}])


def pick_job(q: "Queue", job_id: int = 0, *, demo: bool = True) -> int:
    """The job to debug: ``job_id`` if given (> 0), else the newest failed job, else the newest job.

    On a queue with no jobs at all and ``demo=True``, enqueue :data:`DEMO_JOB`
    and run one burst of one job so it has an attempt, an error and a
    traceback to look at.  Raises NotFound when there is nothing to pick.
    """
    if job_id:
        return q.get(job_id).id
    for status in ("failed", None):
        found = q.jobs(status=status, limit=1)
        if found:
            return found[0].id
    if not demo:
        raise NotFound(f"queue {q.name!r} has no jobs")
    new_id = q.enqueue(DEMO_JOB["type"], DEMO_JOB["payload"], max_attempts=DEMO_JOB["max_attempts"])
    q.work(max_jobs=1, trigger="notebook", params={"purpose": "debug_job demo"})
    return new_id


def report(q: "Queue", job_id: int) -> dict[str, pd.DataFrame]:
    """The job (one row, payload and last progress report included), its attempts (with tracebacks and
    the retry delay a handler asked for) and its events, as DataFrames."""
    from qkit.analysis import frames

    job = q.get(job_id)
    job_df = pd.DataFrame([job.to_dict()])
    return {"job": job_df, "attempts": frames.attempts(q, job_id=job.id, traceback=True),
            "events": frames.events(q, job_id=job.id)}


def rerun(q: "Queue", job_id: int, *, attempt: int | None = None, raise_errors: bool = False) -> Rerun:
    """Run the job's handler once, here, on its payload; the ledger and Redis are not touched.

    ``attempt`` is the attempt number the handler sees in
    ``qkit.current_job()`` (default: the job's last recorded attempt, or 1).
    With ``raise_errors`` the handler's exception propagates (for ``%debug``);
    otherwise it is captured in the returned :class:`Rerun`.
    """
    job = q.get(job_id)
    import_handler_modules(q.settings.handler_modules)
    handler = get_handler(job.type)
    if handler is None:
        raise QkitError(f"no handler is registered for job type {job.type!r} in this process "
                        f"(register it with @qkit.handler or name its module in QKIT_HANDLERS)")
    n = attempt if attempt is not None else max(1, job.attempts)
    host = socket.gethostname().split(".")[0][:24] or "host"
    reports: list[tuple[float, str | None]] = []
    ctx = JobContext(id=job.id, type=job.type, attempt=n, max_attempts=job.max_attempts, queue=job.queue,
                     worker=f"debug-{host}-{os.getpid()}", reporter=lambda f, note: reports.append((f, note)))
    t0 = time.perf_counter()
    try:
        result = run_to_end(ctx, handler, dict(job.payload))
    except Exception as exc:  # noqa: BLE001 - reported, or re-raised on request
        if raise_errors:
            raise
        return Rerun(job.id, job.type, n, ok=False, error=f"{type(exc).__name__}: {exc}",
                     traceback="".join(tb_mod.format_exception(type(exc), exc, exc.__traceback__)),
                     duration_ms=(time.perf_counter() - t0) * 1000, exception=exc, progress=reports)
    return Rerun(job.id, job.type, n, ok=True, result=result, duration_ms=(time.perf_counter() - t0) * 1000,
                 progress=reports)

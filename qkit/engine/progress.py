"""Progress reports of running handlers (``qkit.current_job().progress``), throttled per burst.

A handler's call only sets the job's latest report in memory: it never waits
on SQL.  A daemon thread writes what changed at most once per job per
:data:`INTERVAL_S` through the ledger's background writer
(:meth:`qkit.ledger.Ledger.record_progress`, one statement per batch of jobs),
and when an attempt ends the worker hands over its last report at once
(:meth:`ProgressBoard.finish`), so the final value is always written.  A
handler given up at its timeout runs on alone: what it reports from then on is
ignored.  Registering a job costs nothing: its entry is made by its first report.
See docs/semantics.md#progress.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

from qkit.ledger import utcnow

if TYPE_CHECKING:
    from qkit.engine.lifecycle import Outcome, Runnable
    from qkit.ledger import Ledger

#: at most one progress write per job per this many seconds
INTERVAL_S = 1.0
#: how long a burst's end waits for its last progress rows to be written
FLUSH_TIMEOUT_S = 10.0


class _Entry:
    __slots__ = ("job", "fraction", "note", "at", "dirty", "written")

    def __init__(self, job: "Runnable") -> None:
        self.job = job
        self.fraction = 0.0
        self.note: str | None = None
        self.at: datetime | None = None
        self.dirty = False
        self.written = -INTERVAL_S  # monotonic time of the last write


class ProgressBoard:
    """The latest progress of each job a burst runs; written throttled, off the handlers' threads."""

    def __init__(self, ledger: "Ledger", interval: float = INTERVAL_S) -> None:
        self.ledger = ledger
        self.interval = interval
        self._jobs: dict[int, _Entry] = {}  # jobs that reported in their running attempt
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def reporter(self, job: "Runnable") -> Callable[[float, str | None], None]:
        """What ``current_job().progress`` calls for ``job`` (already validated).  Costs nothing more
        per job: a job's entry is made by its first report."""
        return partial(self.report, job)

    def report(self, job: "Runnable", fraction: float, note: str | None) -> None:
        with self._lock:
            if self._closed or job.abandoned:
                return  # the burst ended, or the handler was given up at its timeout: a late report changes nothing
            entry = self._jobs.get(job.id)
            if entry is None or entry.job is not job:
                entry = self._jobs[job.id] = _Entry(job)
            entry.fraction, entry.note, entry.at, entry.dirty = fraction, note, utcnow(), True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="qkit-progress")
                self._thread.start()
            self._lock.notify()

    def finish(self, outcomes: Sequence["Outcome"]) -> None:
        """These attempts ended: write their last unwritten reports now, and forget them."""
        if not self._jobs:
            return  # the usual case: no handler of the batch reported (their reports happened before this)
        with self._lock:
            done = [e for e in (self._jobs.pop(o.job.id, None) for o in outcomes) if e is not None]
            self._write([e for e in done if e.dirty])

    def close(self) -> None:
        """The burst ends: write every unwritten report and wait (bounded) until the writer has them."""
        with self._lock:
            self._closed = True
            self._write([e for e in self._jobs.values() if e.dirty])
            self._jobs.clear()
            self._lock.notify()
            wrote = self._thread is not None
        if wrote:
            self.ledger.flush_background(FLUSH_TIMEOUT_S)

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                due = [e for e in self._jobs.values() if e.dirty and now - e.written >= self.interval]
                if due:
                    for e in due:
                        e.dirty, e.written = False, now
                    # submitted under the lock (it never waits): the writer gets each job's reports in order
                    self.ledger.record_progress([(e.job.id, e.job.attempt, e.job.epoch, e.fraction, e.note, e.at)
                                                 for e in due])
                    continue
                waiting = [e.written + self.interval - now for e in self._jobs.values() if e.dirty]
                self._lock.wait(min(waiting) if waiting else None)

    def _write(self, entries: list[_Entry]) -> None:
        """Hand ``entries``' reports to the ledger's background writer (the caller holds the lock)."""
        if entries:
            self.ledger.record_progress([(e.job.id, e.job.attempt, e.job.epoch, e.fraction, e.note, e.at)
                                         for e in entries])
            for e in entries:
                e.dirty = False

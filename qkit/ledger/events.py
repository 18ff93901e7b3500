"""The background writer of ``lease_renewed`` events (and of handlers' progress, :mod:`qkit.ledger.progress`):
a lease renewer or a handler must never wait on the database."""
from __future__ import annotations

import queue as queue_mod
import threading
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import insert

from qkit.config import redact
from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import job_events
from qkit.logs import log

#: how long a lease renewer waits for its ``lease_renewed`` event to commit (see Ledger.record_renewal)
RENEWAL_EVENT_WAIT_S = 0.1


class Events(LedgerBase):
    """Lease renewals recorded off the renewer's thread."""

    def record_renewal(self, worker: str, job_ids: Sequence[tuple[int, int]], now: datetime | None = None,
                       wait: float = RENEWAL_EVENT_WAIT_S) -> bool:
        """One ``lease_renewed`` event per (job id, attempt), the first time its lease is renewed.

        The caller is the worker's lease renewer, whose next Redis renewal must
        not wait on the database: while the ledger is locked or slow (another
        writer holding SQLite's lock, a ``LOCK TABLE``, a stalled server) the
        leases of a live worker would expire and its jobs be reclaimed as lost.
        So the rows go to a writer thread; this waits up to ``wait`` seconds
        for their commit (the usual case: written when it returns) and never
        when an earlier write is still pending.  Returns whether the rows are
        committed.  A write that fails is logged and dropped: the event is
        "at most once" per attempt.  :meth:`close` flushes what is pending.
        """
        if not job_ids:
            return True
        now = now or utcnow()
        rows = [dict(job_id=j, at=now, event="lease_renewed", worker=worker, detail={"attempt": a})
                for j, a in job_ids]
        return self._event_writer().submit(rows, wait)

    def _event_writer(self) -> "EventWriter":
        with self._writer_lock:
            if self._writer is None:
                self._writer = EventWriter(self)
            return self._writer



class EventWriter:
    """A daemon thread writing ``job_events`` rows (or the rows of another ``statement``) for callers
    that must not block on the database.

    Rows submitted while a write is pending are written together, in order,
    in the next transaction.  A failed write of rows submitted with ``quiet``
    logs only the exception's type: their values may be job data.
    """

    def __init__(self, ledger: LedgerBase) -> None:
        self.ledger = ledger
        self.pending: queue_mod.Queue[Any] = queue_mod.Queue()
        self.busy = 0  # submitted, not yet written (or dropped)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name="qkit-ledger-events")
        self.thread.start()

    def submit(self, rows: list[dict[str, Any]], wait: float, statement: Any = None, quiet: bool = False) -> bool:
        done = threading.Event()
        with self.lock:
            idle = self.busy == 0
            self.busy += 1
        self.pending.put((rows, done, statement, quiet))
        return done.wait(wait) if idle and wait > 0 else done.is_set()

    def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until every row submitted before this call is written."""
        done = threading.Event()
        with self.lock:
            self.busy += 1
        self.pending.put(([], done, None, False))
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self.pending.get()
            batch = [item]
            while item is not None:
                try:
                    item = self.pending.get_nowait()
                except queue_mod.Empty:
                    break
                batch.append(item)
            work = [b for b in batch if b is not None]
            if work:
                self._write(work)
                with self.lock:
                    self.busy -= len(work)
                for _, done, _, _ in work:
                    done.set()
            if item is None or None in batch:
                return

    def _write(self, work: list[Any]) -> None:
        """One transaction: the rows of consecutive items with the same statement go in one executemany."""
        groups: list[tuple[Any, bool, list[dict[str, Any]]]] = []
        for rows, _, statement, quiet in work:
            if not rows:
                continue
            if groups and groups[-1][0] is statement:
                groups[-1][2].extend(rows)
            else:
                groups.append((statement, quiet, list(rows)))
        if not groups:
            return
        try:
            with self.ledger._write() as conn:
                for statement, _, rows in groups:
                    conn.execute(insert(job_events) if statement is None else statement, rows)
            self.ledger.statements += len(groups)
        except Exception as exc:  # noqa: BLE001 - an event is at most once; the worker goes on
            n = sum(len(rows) for _, _, rows in groups)
            detail = type(exc).__name__ if any(q for _, q, _ in groups) else redact(str(exc)) or type(exc).__name__
            log.warning("could not record %d background row(s) (lease_renewed events, progress): %s", n, detail)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (waiting at most ``timeout`` seconds), then stop the thread."""
        self.pending.put(None)
        self.thread.join(timeout)


"""The background writer of ``lease_renewed`` events: a lease renewer must never wait on the database."""
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
    """A daemon thread writing ``job_events`` rows for callers that must not block on the database.

    Rows submitted while a write is pending are written together, in order,
    in the next transaction.
    """

    def __init__(self, ledger: LedgerBase) -> None:
        self.ledger = ledger
        self.pending: queue_mod.Queue[Any] = queue_mod.Queue()
        self.busy = 0  # submitted, not yet written (or dropped)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name="qkit-ledger-events")
        self.thread.start()

    def submit(self, rows: list[dict[str, Any]], wait: float) -> bool:
        done = threading.Event()
        with self.lock:
            idle = self.busy == 0
            self.busy += 1
        self.pending.put((rows, done))
        return done.wait(wait) if idle and wait > 0 else done.is_set()

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
                rows = [r for b in work for r in b[0]]
                try:
                    with self.ledger._write() as conn:
                        conn.execute(insert(job_events), rows)
                    self.ledger.statements += 1
                except Exception as exc:  # noqa: BLE001 - an event is at most once; the worker goes on
                    log.warning("could not record %d lease_renewed event(s): %s", len(rows),
                                redact(str(exc)) or type(exc).__name__)
                with self.lock:
                    self.busy -= len(work)
                for _, done in work:
                    done.set()
            if item is None or None in batch:
                return

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (waiting at most ``timeout`` seconds), then stop the thread."""
        self.pending.put(None)
        self.thread.join(timeout)


"""An operator's interventions on jobs and queues, in the ledger: cancel, pause, promote
(docs/semantics.md#cancel-pause-promote).

Each is a compare-and-set on the job's row (locked as read on PostgreSQL; SQLite's writer holds the
whole database), so a concurrent claim or settle either comes first and the intervention sees it, or
comes after and finds what the intervention wrote.  A processing job's cancel request and a queue's
pause are rows of ``queue_controls`` (kinds ``cancel``, name = the job id, and ``pause``, name ``''``);
the hot path reads the cancel requests once per batch (:func:`cancel_requests`).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from qkit.errors import NotFound
from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import job_events, jobs, queue_controls

CANCEL, PAUSE = "cancel", "pause"
_SELECT_CANCELS = "SELECT name FROM queue_controls WHERE kind = 'cancel'"


def cancel_requests(conn: Connection) -> set[int]:
    """Ids of the processing jobs whose cancel was requested (every queue: ids are unique), read inside a
    claim or settle transaction after its rows are locked: one statement per batch, a handful of rows."""
    return {int(r[0]) for r in conn.exec_driver_sql(_SELECT_CANCELS) if str(r[0]).isdigit()}


def clear_cancel_requests(conn: Connection, job_ids: Iterable[int]) -> None:
    """Drop the requests of jobs that just ended cancelled (same transaction)."""
    names = [str(i) for i in job_ids]
    if names:
        conn.execute(delete(queue_controls).where(queue_controls.c.kind == CANCEL, queue_controls.c.name.in_(names)))


class Interventions(LedgerBase):
    """Cancel, pause and promote, as the ledger records them."""

    def _locked_row(self, conn: Connection, queue: str, job_id: int, *columns: Any) -> Any:
        query = select(jobs.c.status, *columns).where(jobs.c.id == job_id, jobs.c.queue == queue)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        self.statements += 1
        if row is None:
            raise NotFound(f"no job {job_id} in queue {queue!r}")
        return row

    def cancel(self, queue: str, job_id: int, now: datetime | None = None) -> str:
        """Cancel a job: ``'cancelled'`` (it was pending: now ``cancelled``), ``'requested'`` (it is
        processing: a cancel request is recorded, the job ends cancelled when its attempt ends), or
        ``'terminal'`` (it already was: nothing changed).  NotFound if the queue has no such job."""
        now = now or utcnow()
        with self._write(durable=True) as conn:
            row = self._locked_row(conn, queue, job_id, jobs.c.run_at)
            status = row.status
            if status == "pending":
                conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "pending")
                             .values(status="cancelled", finished_at=now, updated_at=now))
                conn.execute(insert(job_events).values(job_id=job_id, at=now, event="cancelled", worker=None,
                                                       detail={"from": "delayed" if row.run_at > now else "pending"}))
                self.statements += 2
                return "cancelled"
            if status != "processing":
                return "terminal"
            added = conn.execute(self._insert(queue_controls).values(
                queue=queue, kind=CANCEL, name=str(job_id), value={"at": now.isoformat()}, updated_at=now)
                .on_conflict_do_nothing().returning(queue_controls.c.name)).first() is not None
            self.statements += 1
            if added:
                conn.execute(insert(job_events).values(job_id=job_id, at=now, event="cancel_requested",
                                                       worker=None, detail=None))
                self.statements += 1
            return "requested"

    def cancel_requested(self, queue: str) -> list[int]:
        """The queue's jobs with a cancel request not yet carried out."""
        with self.read_engine.connect() as conn:
            return sorted(int(n) for n in conn.execute(select(queue_controls.c.name).where(
                queue_controls.c.queue == queue, queue_controls.c.kind == CANCEL)).scalars())

    def set_paused(self, queue: str, paused: bool, now: datetime | None = None) -> bool:
        """Record the queue as paused (or not); True when that changed it."""
        now = now or utcnow()
        with self._write(durable=True) as conn:
            if paused:
                changed = conn.execute(self._insert(queue_controls).values(
                    queue=queue, kind=PAUSE, name="", value={"at": now.isoformat()}, updated_at=now)
                    .on_conflict_do_nothing().returning(queue_controls.c.name)).first() is not None
            else:
                changed = conn.execute(delete(queue_controls).where(
                    queue_controls.c.queue == queue, queue_controls.c.kind == PAUSE)).rowcount
            self.statements += 1
        return bool(changed)

    def is_paused(self, queue: str) -> bool:
        with self.read_engine.connect() as conn:
            self.statements += 1
            return conn.execute(select(queue_controls.c.name).where(
                queue_controls.c.queue == queue, queue_controls.c.kind == PAUSE)).first() is not None

    def promote(self, queue: str, job_id: int, now: datetime | None = None) -> bool:
        """A pending job due later is due ``now``; False (nothing changed) if it is not pending or already
        due.  NotFound if the queue has no such job."""
        now = now or utcnow()
        with self._write(durable=True) as conn:
            row = self._locked_row(conn, queue, job_id, jobs.c.run_at)
            if row.status != "pending" or row.run_at <= now:
                return False
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "pending")
                         .values(run_at=now, updated_at=now))
            conn.execute(insert(job_events).values(job_id=job_id, at=now, event="promoted", worker=None,
                                                   detail={"was_due": row.run_at.isoformat()}))
            self.statements += 2
        return True

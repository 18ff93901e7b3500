"""Limits per job type in the ledger: ``queue_controls`` rows of kind ``limit`` (name = the type).

The ledger's rows are the truth; Redis holds the working copy the claim script
reads, restored from these rows (:mod:`qkit.ops.limits`, docs/semantics.md#limits-per-type).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select

from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import job_attempts, jobs, queue_controls

LIMIT = "limit"


class LimitRows(LedgerBase):
    """``queue_controls`` rows of kind ``limit``, and the ledger reads limits need."""

    def put_limit(self, queue: str, job_type: str, value: dict[str, Any]) -> None:
        """Set (insert or replace) the limit of ``job_type`` in ``queue``."""
        now = utcnow()
        stmt = self._insert(queue_controls).values(queue=queue, kind=LIMIT, name=job_type, value=value,
                                                   updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=["queue", "kind", "name"],
                                          set_=dict(value=value, updated_at=now))
        with self._write(durable=True) as conn:
            conn.execute(stmt)

    def delete_limit(self, queue: str, job_type: str) -> bool:
        """Remove the limit of ``job_type``; True if there was one."""
        with self._write(durable=True) as conn:
            return conn.execute(delete(queue_controls).where(
                queue_controls.c.queue == queue, queue_controls.c.kind == LIMIT,
                queue_controls.c.name == job_type)).rowcount > 0

    def limit_rows(self, queue: str) -> dict[str, dict[str, Any]]:
        """type -> stored value of every limit of ``queue``."""
        with self.read_engine.connect() as conn:
            return {r.name: r.value for r in conn.execute(
                select(queue_controls.c.name, queue_controls.c.value).where(
                    queue_controls.c.queue == queue, queue_controls.c.kind == LIMIT).order_by(queue_controls.c.name))}

    def active_ids_of_type(self, queue: str, job_type: str) -> list[int]:
        """Ids of the pending, processing and failed jobs of one type (those Redis may hold)."""
        with self.read_engine.connect() as conn:
            return [int(i) for i in conn.execute(select(jobs.c.id).where(
                jobs.c.queue == queue, jobs.c.status.in_(("pending", "processing", "failed")),
                jobs.c.type == job_type).order_by(jobs.c.id)).scalars()]

    def has_type(self, queue: str, job_type: str) -> bool:
        """True if the queue has, or had, a job of this type."""
        with self.read_engine.connect() as conn:
            return conn.execute(select(jobs.c.id).where(jobs.c.queue == queue, jobs.c.type == job_type)
                                .limit(1)).first() is not None

    def attempt_spans(self, queue: str, job_type: str, sample: int) -> list[tuple[datetime, datetime | None]]:
        """(started_at, finished_at) of the ``sample`` most recently started attempts of one type."""
        a, j = job_attempts, jobs
        with self.read_engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(a.c.started_at, a.c.finished_at).select_from(a.join(j, j.c.id == a.c.job_id))
                .where(j.c.queue == queue, j.c.type == job_type)
                .order_by(a.c.started_at.desc()).limit(sample))]

"""The SQL of recurring schedules (table ``schedules``, docs/semantics.md#schedules).

A fire is one transaction: a compare-and-set moves ``next_fire_at`` on from the
value the ticker read, and the fire's jobs are inserted under idempotency keys
derived from (schedule, fire time).  Of several processes ticking at once, one
wins the compare-and-set; the others change nothing (on PostgreSQL their
UPDATE waits for the winner's row lock, then finds the row moved on; SQLite
writers are serialized by ``BEGIN IMMEDIATE``).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import delete, select, update

from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import schedules
from qkit.model import NewJob

#: what :meth:`Schedules.due_schedules` reads: the definition and the compare-and-set's expected values
_DUE_COLUMNS = ("name", "cron", "tz", "type", "payload", "priority", "max_attempts", "catch_up", "next_fire_at",
                "updated_at")


class Schedules(LedgerBase):
    """Recurring schedules: define, list, remove, and fire them (the jobs go in through ``HotPath._insert_jobs``)."""

    def save_schedule(self, queue: str, values: dict[str, Any]) -> None:
        """Insert a schedule, or replace the definition of the one of that name (``created_at`` stays)."""
        now = utcnow()
        row = {**values, "queue": queue, "created_at": now, "updated_at": now}
        stmt = self._insert(schedules).values(**row)
        stmt = stmt.on_conflict_do_update(index_elements=["queue", "name"],
                                          set_={k: stmt.excluded[k] for k in row if k not in ("queue", "name",
                                                                                             "created_at")})
        with self._write(durable=True) as conn:
            conn.execute(stmt)
            self.statements += 1

    def get_schedule(self, queue: str, name: str) -> dict[str, Any] | None:
        with self.read_engine.connect() as conn:
            row = conn.execute(select(schedules).where(schedules.c.queue == queue,
                                                       schedules.c.name == name)).mappings().first()
        return dict(row) if row is not None else None

    def list_schedules(self, queue: str) -> list[dict[str, Any]]:
        """The queue's schedules, soonest fire first."""
        with self.read_engine.connect() as conn:
            rows = conn.execute(select(schedules).where(schedules.c.queue == queue)
                                .order_by(schedules.c.next_fire_at, schedules.c.name)).mappings().all()
        return [dict(r) for r in rows]

    def delete_schedule(self, queue: str, name: str) -> bool:
        with self._write(durable=True) as conn:
            n = conn.execute(delete(schedules).where(schedules.c.queue == queue, schedules.c.name == name)).rowcount
            self.statements += 1
        return n > 0

    def due_schedules(self, queue: str, now: datetime) -> list[dict[str, Any]]:
        """The schedules with a fire time at or before ``now``: one statement (what every burst pays)."""
        query = (select(*(schedules.c[c] for c in _DUE_COLUMNS))
                 .where(schedules.c.queue == queue, schedules.c.next_fire_at <= now)
                 .order_by(schedules.c.next_fire_at, schedules.c.name))
        with self.read_engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        self.statements += 1
        return [dict(r) for r in rows]

    def fire_schedule(self, queue: str, name: str, *, expect_next: datetime, expect_updated: datetime,
                      next_fire_at: datetime, last_fire_at: datetime | None,
                      jobs: Sequence[NewJob]) -> list[tuple[int, bool]] | None:
        """Move the schedule on and insert its jobs, in one transaction; None if another ticker moved it first.

        The compare-and-set expects the ``next_fire_at`` and ``updated_at`` the
        caller read, so a schedule redefined meanwhile is not fired by its old
        definition.  Returns (job id, created) per job, as
        :meth:`~qkit.ledger.hotpath.HotPath.insert_jobs` does.  The rows' times are the
        ledger's clock (Redis's), whatever ``now`` decided which fires were due.
        """
        now = utcnow()
        cas = (update(schedules)
               .where(schedules.c.queue == queue, schedules.c.name == name,
                      schedules.c.next_fire_at == expect_next, schedules.c.updated_at == expect_updated)
               .values(next_fire_at=next_fire_at, updated_at=now))
        with self._write(durable=True) as conn:
            moved = conn.execute(cas).rowcount
            self.statements += 1
            if moved != 1:
                return None
            results = self._insert_jobs(conn, queue, jobs, now) if jobs else []  # type: ignore[attr-defined]
            if results:
                conn.execute(update(schedules).where(schedules.c.queue == queue, schedules.c.name == name)
                             .values(last_fire_at=last_fire_at, last_job_id=results[-1][0]))
                self.statements += 1
        return results

"""The dashboard's reads (docs/http-api.md#dashboard): jobs finished per minute, filtered job pages, one row.

Each is one query whatever the ledger's size, through the read engine; the
dashboard (:mod:`qkit.api.dashboard`) only shapes what they return.  ``owner``
narrows a read to one API user's jobs (a JWT's ``sub``), as the API does.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from qkit.ledger.engine import LedgerBase
from qkit.ledger.schema import jobs, worker_runs

#: the job columns a listing shows (no payload, result or full error: a page of big payloads would be huge)
_LISTED = ("id", "queue", "type", "status", "priority", "attempts", "max_attempts", "run_at", "created_at",
           "started_at", "finished_at", "owner", "progress")


class DashboardReads(LedgerBase):
    """Reads for the operator's pages (the counts are :meth:`qkit.ledger.overview.Overview.queue_overview`)."""

    def _read(self, query: Any) -> list[dict[str, Any]]:
        try:
            with self.read_engine.connect() as conn:
                return [dict(r) for r in conn.execute(query).mappings()]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def finished_per_minute(self, *, since: datetime, owner: str | None = None
                            ) -> dict[str, dict[str, tuple[int, int]]]:
        """Per queue and UTC minute (``'YYYY-MM-DD HH:MM'``): (completed, failed) jobs that finished since ``since``.

        One GROUP BY over the jobs that finished in the window; the minute is cut from the stored
        text on SQLite, ``to_char`` in UTC on PostgreSQL.  Nothing indexes ``finished_at`` (the hot
        path would pay for it), so this scans the table: the dashboard keeps its answer a while.
        """
        if self.dialect == "sqlite":
            minute = func.substr(jobs.c.finished_at, 1, 16)
        else:
            minute = func.to_char(func.timezone("UTC", jobs.c.finished_at), "YYYY-MM-DD HH24:MI")
        query = (select(jobs.c.queue, jobs.c.status, minute.label("minute"), func.count().label("n"))
                 .where(jobs.c.finished_at >= since, jobs.c.status.in_(("completed", "failed")))
                 .group_by(jobs.c.queue, jobs.c.status, minute))
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for r in self._read(query):
            ok, bad = out.setdefault(r["queue"], {}).get(r["minute"], (0, 0))
            n = int(r["n"])
            out[r["queue"]][r["minute"]] = (ok + n, bad) if r["status"] == "completed" else (ok, bad + n)
        return out

    def find_jobs(self, *, queue: str | None = None, status: str | None = None, type: str | None = None,
                  since: datetime | None = None, until: datetime | None = None, owner: str | None = None,
                  before_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Jobs, newest first, filtered by queue, status, type and creation time (``since`` <= created < ``until``);
        ``before_id`` pages backwards.  Without payload and result; ``error`` is its first line, clipped."""
        error = func.substr(jobs.c.error, 1, 200).label("error")
        query = select(*[jobs.c[name] for name in _LISTED], error)
        for column, value in ((jobs.c.queue, queue), (jobs.c.status, status), (jobs.c.type, type),
                              (jobs.c.owner, owner)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(jobs.c.created_at >= since)
        if until is not None:
            query = query.where(jobs.c.created_at < until)
        if before_id is not None:
            query = query.where(jobs.c.id < before_id)
        return self._read(query.order_by(jobs.c.id.desc()).limit(limit))

    def job_row(self, job_id: int) -> dict[str, Any] | None:
        """Every column of one job (``owner`` and ``progress`` included), or None."""
        rows = self._read(select(jobs).where(jobs.c.id == job_id))
        return rows[0] if rows else None

    def run_row(self, run_id: int) -> dict[str, Any] | None:
        """One ``worker_runs`` row, or None."""
        rows = self._read(select(worker_runs).where(worker_runs.c.id == run_id))
        return rows[0] if rows else None

    def run_page(self, *, queue: str | None = None, before_id: int | None = None,
                 limit: int = 50) -> list[dict[str, Any]]:
        """``worker_runs`` rows, newest first, of one queue or all; ``before_id`` pages backwards."""
        query = select(worker_runs)
        if queue is not None:
            query = query.where(worker_runs.c.queue == queue)
        if before_id is not None:
            query = query.where(worker_runs.c.id < before_id)
        return self._read(query.order_by(worker_runs.c.id.desc()).limit(limit))

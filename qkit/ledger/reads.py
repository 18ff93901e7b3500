"""Named reads of the ledger: jobs, attempts, events, listings and counts, for the facade and the tools."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import and_, case, func, select
from sqlalchemy.exc import SQLAlchemyError

from qkit.errors import NotFound
from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import job_attempts, job_events, jobs, worker_runs
from qkit.model import STATUSES, Job


def _row_to_job(row: Any) -> Job:
    m = row._mapping
    return Job(**{name: m[name] for name in Job.__dataclass_fields__})



class Reads(LedgerBase):
    """Reads through the read engine (on SQLite, never waiting for the writer's lock)."""

    def get(self, job_id: int, queue: str | None = None) -> Job:
        """One job; NotFound if there is none (in that queue)."""
        query = select(jobs).where(jobs.c.id == job_id)
        if queue is not None:
            query = query.where(jobs.c.queue == queue)
        with self.read_engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            where = f" in queue {queue!r}" if queue else ""
            raise NotFound(f"no job {job_id}{where}")
        return _row_to_job(row)

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        with self.read_engine.connect() as conn:
            rows = conn.execute(select(job_attempts).where(job_attempts.c.job_id == job_id)
                                .order_by(job_attempts.c.epoch, job_attempts.c.attempt)).mappings().all()
        return [dict(r) for r in rows]

    def events(self, job_id: int) -> list[dict[str, Any]]:
        with self.read_engine.connect() as conn:
            rows = conn.execute(select(job_events).where(job_events.c.job_id == job_id)
                                .order_by(job_events.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def list_jobs(self, queue: str, *, status: str | None = None, type: str | None = None,
                  limit: int = 100, before_id: int | None = None, owner: str | None = None) -> list[Job]:
        """Newest first, optionally filtered (``owner``: only that user's jobs); ``before_id`` pages backwards."""
        return [_row_to_job(r) for r in self._list(select(jobs), queue, status, type, limit, before_id, owner)]

    def job_summaries(self, queue: str, *, status: str | None = None, type: str | None = None,
                      limit: int = 100, before_id: int | None = None, error_chars: int = 1000,
                      owner: str | None = None) -> list[dict[str, Any]]:
        """Like :meth:`list_jobs` but as dicts without payload and result, and with ``error``
        cut to ``error_chars``: a listing of 1,000 jobs of 256 KiB payloads would be 256 MB."""
        columns = [c for c in jobs.c if c.name not in ("payload", "result", "error")]
        query = select(*columns, func.substr(jobs.c.error, 1, error_chars).label("error"))
        try:
            return [dict(r._mapping) for r in self._list(query, queue, status, type, limit, before_id, owner)]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def _list(self, query: Any, queue: str, status: str | None, type: str | None, limit: int,
              before_id: int | None, owner: str | None = None) -> list[Any]:
        query = query.where(jobs.c.queue == queue)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        if status:
            query = query.where(jobs.c.status == status)
        if type:
            query = query.where(jobs.c.type == type)
        if before_id is not None:
            query = query.where(jobs.c.id < before_id)
        with self.read_engine.connect() as conn:
            return conn.execute(query.order_by(jobs.c.id.desc()).limit(limit)).all()

    def status_counts(self, queue: str, now: datetime | None = None) -> dict[str, int]:
        """Jobs per status, and pending split into due and delayed, in one query."""
        now = now or utcnow()
        due = func.coalesce(func.sum(case((and_(jobs.c.status == "pending", jobs.c.run_at <= now), 1), else_=0)), 0)
        with self.read_engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count(), due).where(jobs.c.queue == queue)
                                .group_by(jobs.c.status)).all()
        counts = {s: 0 for s in STATUSES}
        due_total = 0
        for status, n, d in rows:
            counts[status] = int(n)
            due_total += int(d or 0)
        counts["due"] = due_total
        counts["delayed"] = counts["pending"] - due_total
        return counts

    def exec_stats(self, queue: str) -> dict[str, Any]:
        """Average execution time of completed attempts, and attempt outcomes."""
        with self.read_engine.connect() as conn:
            rows = conn.execute(
                select(job_attempts.c.outcome, func.count(), func.avg(job_attempts.c.duration_ms))
                .select_from(job_attempts.join(jobs, jobs.c.id == job_attempts.c.job_id))
                .where(jobs.c.queue == queue).group_by(job_attempts.c.outcome)).all()
        out: dict[str, Any] = {"attempts": {}, "avg_exec_ms": None}
        for outcome, n, avg in rows:
            out["attempts"][outcome or "running"] = int(n)
            if outcome == "completed" and avg is not None:
                out["avg_exec_ms"] = round(float(avg), 3)
        return out

    def active_rows(self, queue: str) -> list[tuple[int, str, int, datetime, int]]:
        """(id, status, priority, run_at, epoch) of every pending, processing or failed job."""
        with self.read_engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(jobs.c.id, jobs.c.status, jobs.c.priority, jobs.c.run_at, jobs.c.epoch)
                .where(jobs.c.queue == queue, jobs.c.status.in_(("pending", "processing", "failed"))))]

    def existing_ids(self, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        found: set[int] = set()
        with self.read_engine.connect() as conn:
            for start in range(0, len(ids), 500):
                found |= set(conn.execute(select(jobs.c.id).where(jobs.c.id.in_(ids[start:start + 500]))).scalars())
        return found


    def dead(self, queue: str, limit: int | None = None) -> list[Job]:
        """The DLQ: failed jobs, newest failure first."""
        query = select(jobs).where(jobs.c.queue == queue, jobs.c.status == "failed") \
            .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc())
        if limit:
            query = query.limit(limit)
        with self.read_engine.connect() as conn:
            return [_row_to_job(r) for r in conn.execute(query)]



# ---------------------------------------------------------------- named reads for the ops tools and the CLI
def queue_runs(ledger: LedgerBase, queue: str, limit: int = 200, before_id: int | None = None) -> list[dict[str, Any]]:
    """The queue's ``worker_runs`` rows, newest first (``qkit runs``); ``before_id`` pages backwards."""
    query = select(worker_runs).where(worker_runs.c.queue == queue)
    if before_id is not None:
        query = query.where(worker_runs.c.id < before_id)
    with ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(query.order_by(worker_runs.c.id.desc()).limit(limit)).mappings()]


def runs_of_workers(ledger: LedgerBase, names: Iterable[str]) -> list[dict[str, Any]]:
    """The ``worker_runs`` rows of the given worker names, oldest first."""
    with ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(worker_runs).where(worker_runs.c.worker.in_(sorted(names)))
                                              .order_by(worker_runs.c.id)).mappings().all()]


def statuses(ledger: LedgerBase, queue: str, ids: Iterable[int]) -> dict[int, str]:
    """Ledger status of each id that has a row in ``queue`` (ids without one are left out)."""
    ids = sorted(int(i) for i in ids)
    found: dict[int, str] = {}
    with ledger.read_engine.connect() as conn:
        for start in range(0, len(ids), 500):
            found.update(conn.execute(select(jobs.c.id, jobs.c.status).where(
                jobs.c.queue == queue, jobs.c.id.in_(ids[start:start + 500]))).all())
    return found


def dead_with_fingerprints(ledger: LedgerBase, queue: str) -> list[dict[str, Any]]:
    """Failed jobs of the queue with the stored fingerprint of their final attempt (one query)."""
    j, a = jobs, job_attempts
    query = (select(j.c.id, j.c.type, j.c.error, j.c.payload, j.c.finished_at, j.c.attempts, a.c.fingerprint)
             .select_from(j.outerjoin(a, and_(a.c.job_id == j.c.id, a.c.epoch == j.c.epoch,
                                              a.c.attempt == j.c.attempts)))
             .where(j.c.queue == queue, j.c.status == "failed").order_by(j.c.id))
    with ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def claim_waits(ledger: LedgerBase, queue: str, now: datetime, sample: int) -> tuple[list[Any], list[Any]]:
    """For the starvation view: (priority, created_at, started_at, type) of the ``sample`` most recently created
    claimed jobs, and per priority (priority, n, id, run_at) of the job due the longest with how many are due."""
    j = jobs
    with ledger.read_engine.connect() as conn:
        claimed = conn.execute(select(j.c.priority, j.c.created_at, j.c.started_at, j.c.type)
                               .where(j.c.queue == queue, j.c.started_at.is_not(None))
                               .order_by(j.c.id.desc()).limit(sample)).all()
        # per priority: how many are due and waiting, and the one due the longest (a window function:
        # one query however many priorities)
        due = (j.c.queue == queue) & (j.c.status == "pending") & (j.c.run_at <= now)
        ranked = select(j.c.id, j.c.priority, j.c.run_at,
                        func.row_number().over(partition_by=j.c.priority, order_by=(j.c.run_at, j.c.id)).label("rn"),
                        func.count().over(partition_by=j.c.priority).label("n")).where(due).subquery()
        firsts = conn.execute(select(ranked.c.priority, ranked.c.n, ranked.c.id, ranked.c.run_at)
                              .where(ranked.c.rn == 1)).all()
    return claimed, firsts

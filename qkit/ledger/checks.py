"""The audit's reads (qkit/ops/audit.py): rows that break the ledger's invariants, and job states in bulk.

Each query returns only suspect rows; :mod:`qkit.ops.audit` words them as findings.
"""
from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy import and_, case, func, not_, or_, select

from qkit.ledger.engine import LedgerBase
from qkit.ledger.schema import job_attempts, jobs
from qkit.model import OUTCOMES, STATUSES

#: attempt outcomes after which the job may run again
RETRIED_OUTCOMES = ("failed", "timeout", "lost")


def queue_totals(ledger: LedgerBase, queue: str) -> tuple[int, dict[int, str]]:
    """(how many jobs the queue has, id -> status of those not completed or cancelled)."""
    with ledger.read_engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(jobs).where(jobs.c.queue == queue)).scalar())
        active = dict(conn.execute(select(jobs.c.id, jobs.c.status).where(
            jobs.c.queue == queue, jobs.c.status.not_in(("completed", "cancelled")))).all())
    return total, active


def invariant_rows(ledger: LedgerBase, queue: str, ids: list[int] | None = None) -> dict[str, list[Any]]:
    """Rows of the queue (or only ``ids``) that break an invariant, by check:

    ``bad_status`` (id, status); ``counted`` (id, status, attempts, max_attempts, n, done): attempt
    rows of the current epoch against the counters; ``attempts`` (job_id, epoch, attempt, outcome,
    status, cur, cur_attempts): attempts whose outcome does not fit their place; ``job_times`` and
    ``attempt_times``: times out of order; ``overlaps`` (job_id, epoch, attempt, finished_at,
    next_start): an attempt that began before the one before it ended.
    """
    j, a = jobs, job_attempts

    def scope(query: Any) -> Any:
        query = query.where(j.c.queue == queue)
        return query if ids is None else query.where(j.c.id.in_(ids))

    lost_like = RETRIED_OUTCOMES
    completed_n = func.coalesce(func.sum(case((a.c.outcome == "completed", 1), else_=0)), 0)
    rows_n = func.count(a.c.id)
    out: dict[str, list[Any]] = {}
    with ledger.read_engine.connect() as conn:
        out["bad_status"] = conn.execute(scope(select(j.c.id, j.c.status).where(not_(j.c.status.in_(STATUSES))))).all()
        counted = scope(
            select(j.c.id, j.c.status, j.c.attempts, j.c.max_attempts, rows_n.label("n"), completed_n.label("done"))
            .select_from(j.outerjoin(a, and_(a.c.job_id == j.c.id, a.c.epoch == j.c.epoch)))
        ).group_by(j.c.id, j.c.status, j.c.attempts, j.c.max_attempts).having(or_(
            rows_n != j.c.attempts, j.c.attempts > j.c.max_attempts, completed_n > 1,
            and_(j.c.status == "completed", completed_n != 1), and_(j.c.status.not_in(("completed", "cancelled")), completed_n > 0)))
        out["counted"] = conn.execute(counted).all()
        earlier = or_(a.c.epoch < j.c.epoch, a.c.attempt < j.c.attempts)
        last = and_(a.c.epoch == j.c.epoch, a.c.attempt == j.c.attempts)
        agrees = or_(and_(j.c.status == "processing", a.c.outcome.is_(None)),
                     and_(j.c.status == "completed", a.c.outcome == "completed"),
                     and_(j.c.status.in_(("failed", "pending")), a.c.outcome.in_(lost_like)),
                     # cancelled while its last attempt ran: that attempt ended however it ended
                     and_(j.c.status == "cancelled", a.c.outcome.is_not(None)))
        query = scope(select(a.c.job_id, a.c.epoch, a.c.attempt, a.c.outcome, j.c.status, j.c.epoch.label("cur"),
                             j.c.attempts.label("cur_attempts"))
                      .select_from(a.join(j, j.c.id == a.c.job_id))
                      .where(or_(and_(earlier, or_(a.c.outcome.is_(None), not_(a.c.outcome.in_(lost_like)))),
                                 and_(last, not_(agrees)),
                                 and_(a.c.outcome.is_not(None), not_(a.c.outcome.in_(OUTCOMES))))))
        out["attempts"] = conn.execute(query.order_by(a.c.job_id, a.c.epoch, a.c.attempt)).all()
        out["job_times"] = conn.execute(scope(select(j.c.id, j.c.created_at, j.c.started_at, j.c.finished_at).where(
            or_(j.c.started_at < j.c.created_at, j.c.finished_at < j.c.started_at,
                j.c.finished_at < j.c.created_at)))).all()
        out["attempt_times"] = conn.execute(scope(select(a.c.job_id, a.c.attempt, a.c.started_at, a.c.finished_at)
                                                  .select_from(a.join(j, j.c.id == a.c.job_id))
                                                  .where(a.c.finished_at < a.c.started_at))).all()
        nxt = a.alias("next_attempt")
        pairs = scope(select(a.c.job_id, a.c.epoch, a.c.attempt, a.c.finished_at, nxt.c.started_at.label("next_start"))
                      .select_from(a.join(nxt, and_(nxt.c.job_id == a.c.job_id, nxt.c.epoch == a.c.epoch,
                                                    nxt.c.attempt == a.c.attempt + 1))
                                   .join(j, j.c.id == a.c.job_id))
                      .where(nxt.c.started_at < a.c.finished_at))
        out["overlaps"] = conn.execute(pairs).all()
    return out


def job_states(ledger: LedgerBase, queue: str, ids: Iterable[int]) -> tuple[dict[int, tuple[str, int]],
                                                                          dict[tuple[int, int, int], str | None]]:
    """(id -> (status, epoch), (id, epoch, attempt) -> outcome) of the given jobs of the queue."""
    wanted = sorted(set(int(i) for i in ids))
    status: dict[int, tuple[str, int]] = {}
    outcomes: dict[tuple[int, int, int], str | None] = {}
    with ledger.read_engine.connect() as conn:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            status.update({r.id: (r.status, r.epoch) for r in conn.execute(
                select(jobs.c.id, jobs.c.status, jobs.c.epoch).where(jobs.c.queue == queue, jobs.c.id.in_(chunk)))})
            outcomes.update({(r.job_id, r.epoch, r.attempt): r.outcome for r in conn.execute(
                select(job_attempts.c.job_id, job_attempts.c.epoch, job_attempts.c.attempt, job_attempts.c.outcome)
                .where(job_attempts.c.job_id.in_(chunk)))})
    return status, outcomes

"""Reads for the operator's view of every queue: the queues overview (``GET /api/queues``) and the figures
``GET /metrics`` exposes, each a few GROUP BY queries over the whole ledger, read when asked.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import and_, case, func, select, union
from sqlalchemy.exc import SQLAlchemyError

from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import job_attempts, jobs, queue_controls, schedules, worker_runs
from qkit.model import STATUSES


def _due(now: datetime) -> Any:
    return and_(jobs.c.status == "pending", jobs.c.run_at <= now)


class Overview(LedgerBase):
    """Every queue at once, for the overview route and the metrics collector."""

    def queue_names(self, *, with_jobs: bool = True) -> list[str]:
        """Every queue the ledger knows: it has jobs, bursts, schedules or controls (``with_jobs=False``: all but
        the jobs, for a caller that counts the jobs' queues anyway: their scan is the costly part)."""
        others = (worker_runs, schedules, queue_controls)
        query = union(*(select(t.c.queue) for t in ((jobs, *others) if with_jobs else others)))
        try:
            with self.read_engine.connect() as conn:
                return sorted(r[0] for r in conn.execute(query))
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def queue_overview(self, now: datetime | None = None, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Per queue the ledger knows, by name: ``counts`` per status, ``due`` (the depth: pending and due now),
        ``delayed``, ``oldest_due_at`` (run_at of the job due the longest, or None) and ``paused``.

        ``owner``: only that API user's jobs are counted, and only the queues where they have some.
        """
        now = now or utcnow()
        mine = [] if owner is None else [jobs.c.owner == owner]
        out: dict[str, dict[str, Any]] = {}

        def row(name: str) -> dict[str, Any]:  # a queue written meanwhile gets its row too
            return out.setdefault(name, {"queue": name, "counts": {s: 0 for s in STATUSES}, "due": 0, "delayed": 0,
                                         "oldest_due_at": None, "paused": False})

        for name in self.queue_names(with_jobs=False) if owner is None else ():  # the jobs' own come next
            row(name)
        try:
            with self.read_engine.connect() as conn:
                for queue, status, n in conn.execute(select(jobs.c.queue, jobs.c.status, func.count()).where(*mine)
                                                     .group_by(jobs.c.queue, jobs.c.status)):
                    row(queue)["counts"][status] = int(n)
                for queue, n, oldest in conn.execute(select(jobs.c.queue, func.count(), func.min(jobs.c.run_at))
                                                     .where(_due(now), *mine).group_by(jobs.c.queue)):
                    row(queue).update(due=int(n), oldest_due_at=oldest)
                for (queue,) in conn.execute(select(queue_controls.c.queue).where(queue_controls.c.kind == "pause")):
                    if owner is None or queue in out:
                        row(queue)["paused"] = True
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None
        for item in out.values():
            item["delayed"] = max(0, item["counts"]["pending"] - item["due"])
        return [out[name] for name in sorted(out)]

    def type_counts(self) -> list[tuple[str, str, str, int]]:
        """(queue, type, status, jobs) for every combination present."""
        try:
            with self.read_engine.connect() as conn:
                return [(q, t, s, int(n)) for q, t, s, n in conn.execute(
                    select(jobs.c.queue, jobs.c.type, jobs.c.status, func.count())
                    .group_by(jobs.c.queue, jobs.c.type, jobs.c.status))]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def attempt_figures(self, buckets_ms: Sequence[float]) -> list[dict[str, Any]]:
        """Per (queue, type, outcome) of the attempts recorded (outcome None: still running): ``n``, and over
        those with a duration, ``timed`` (how many), ``sum_ms`` and ``le`` (how many took at most each bucket
        bound), in one query: the execution-time histogram's data."""
        a = job_attempts
        timed = a.c.duration_ms.is_not(None)
        columns = [func.count(), func.count(a.c.duration_ms), func.coalesce(func.sum(a.c.duration_ms), 0.0)]
        columns += [func.coalesce(func.sum(case((and_(timed, a.c.duration_ms <= bound), 1), else_=0)), 0)
                    for bound in buckets_ms]
        query = (select(jobs.c.queue, jobs.c.type, a.c.outcome, *columns)
                 .select_from(a.join(jobs, jobs.c.id == a.c.job_id))
                 .group_by(jobs.c.queue, jobs.c.type, a.c.outcome))
        try:
            with self.read_engine.connect() as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None
        return [{"queue": r[0], "type": r[1], "outcome": r[2], "n": int(r[3]), "timed": int(r[4]),
                 "sum_ms": float(r[5]), "le": [int(x) for x in r[6:]]} for r in rows]

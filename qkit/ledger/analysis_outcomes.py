"""Analysis SQL of handler-directed outcomes: the retry delays handlers asked for (docs/semantics.md#handler-outcomes).

Beside :mod:`qkit.ledger.analysis` (same :class:`~qkit.ledger.analysis.Scope`, same
``read`` helpers), aggregated in the database like the other notebook figures.
"""
from __future__ import annotations

import pandas as pd
from sqlalchemy import Float, case, cast, distinct, func, select
from sqlalchemy.engine import Connection

from qkit.ledger.analysis import Scope, run
from qkit.ledger.schema import job_attempts, jobs


def retry_after_stats(conn: Connection, scope: Scope, cap_s: float) -> pd.DataFrame:
    """Attempts whose handler named a retry delay, by ``type`` and ``source`` (``qkit.Retry`` or
    ``Retry-After``, from the attempt's error): ``attempts``, ``jobs``, ``min_s``, ``mean_s``, ``max_s``
    (the delays asked), and ``over_cap`` (asked more than ``cap_s``, so waited ``cap_s``)."""
    a = job_attempts
    asked = cast(a.c.retry_after_ms, Float) / 1000.0
    source = case((a.c.error.like("Retry:%"), "qkit.Retry"), else_="Retry-After").label("source")
    query = (select(jobs.c.type, source, func.count().label("attempts"), func.count(distinct(a.c.job_id)).label("jobs"),
                    func.min(asked).label("min_s"), func.avg(asked).label("mean_s"), func.max(asked).label("max_s"),
                    func.sum(case((a.c.retry_after_ms > float(cap_s) * 1000.0, 1), else_=0)).label("over_cap"))
             .select_from(a.join(jobs, jobs.c.id == a.c.job_id))
             .where(*scope.where(), a.c.retry_after_ms.is_not(None))
             .group_by(jobs.c.type, source).order_by(jobs.c.type, source))
    return run(conn, query)

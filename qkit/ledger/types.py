"""Which job types some worker has handled, as the ledger remembers it (``qkit enqueue``'s warning and
``qkit explain``'s advice, :mod:`qkit.ops.handled`)."""
from __future__ import annotations

from sqlalchemy import exists, or_, select

from qkit.ledger.engine import LedgerBase
from qkit.ledger.schema import jobs

#: the error a worker records for a job whose type it has no handler for (qkit/engine/batches.py)
UNKNOWN_TYPE_ERROR = "UnknownJobType:"


def was_handled(ledger: LedgerBase, type: str) -> bool:
    """True if a worker ran a job of ``type`` (in any queue): one that has an attempt that did not end
    for want of a handler.  One query, stopping at the first such job."""
    handled = (jobs.c.type == type) & (jobs.c.attempts > 0) & or_(
        jobs.c.error.is_(None), ~jobs.c.error.startswith(UNKNOWN_TYPE_ERROR, autoescape=True))
    with ledger.read_engine.connect() as conn:
        return bool(conn.execute(select(exists().where(handled))).scalar())

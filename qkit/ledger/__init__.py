"""The SQL ledger (docs/architecture.md#the-ledger): the source of truth for every job and attempt.

This package owns every SQL statement qkit sends: ``schema`` (tables, migrations), ``engine``
(engines, pragmas, errors), ``hotpath`` (enqueue/claim/settle), ``admin`` (replay, purge),
``runs`` (worker_runs), ``events`` (the background event writer), ``reads`` (named reads).
What becomes of a job after an attempt is decided in :mod:`qkit.engine.lifecycle`, not here.

Redis is only the dispatch index.  Each step writes the ledger first and
Redis second, so a crash between the two is repaired from the ledger:

========== ================================= ======================================
step       ledger (first, one transaction)   Redis (second, one script)
========== ================================= ======================================
enqueue    insert ``pending`` rows + events  push ids to ready/delayed
claim      (after Redis) ``processing``,      claim.lua moves ready -> leased
           open attempt rows, events          (Redis first: the lease is the lock)
complete   ``completed``, attempt closed      settle 'done' (drop the lease)
retry      ``pending`` + run_at, attempt      settle 'retry' (lease -> delayed)
dead       ``failed``, attempt closed         settle 'dead' (lease -> DLQ)
replay     ``failed`` -> ``pending``          push in 'repair' mode (DLQ -> ready)
========== ================================= ======================================

Crash windows and their repair: a pending row missing from Redis is pushed
again by the next burst (:mod:`qkit.ops.reconcile`); a Redis entry whose row is
missing or terminal is dropped when claimed, never run; a lease whose ledger
write never happened expires and is reclaimed; an outcome committed but not
settled in Redis is found terminal at reclaim and dropped without a new attempt.
Completion is fenced in SQL: a worker may only settle the attempt the ledger
says is current (status ``processing``, same attempt and replay epoch).
"""
from __future__ import annotations

from qkit.ledger.admin import Admin
from qkit.ledger.dashboard import DashboardReads
from qkit.ledger.engine import LedgerBase, LedgerFailure, transient, utcnow
from qkit.ledger.events import RENEWAL_EVENT_WAIT_S, EventWriter, Events
from qkit.ledger.interventions import Interventions
from qkit.ledger.limits import LimitRows
from qkit.ledger.hotpath import (CLAIM_JOBS, INSERT_ATTEMPT, INSERT_EVENT, INSERT_JOB, NOT_DUE_SLACK, SELECT_CLAIM,
                                 SELECT_FENCE, SELECT_OPEN, SETTLE_ATTEMPT, SETTLE_JOB, DriverSQL, HotPath)
from qkit.ledger.overview import Overview
from qkit.ledger.progress import Progress
from qkit.ledger.reads import Reads
from qkit.ledger.runs import Runs
from qkit.ledger.schedules import Schedules
from qkit.ledger.schema import (MAX_TEXT, MIGRATIONS, SCHEMA_VERSION, job_attempts, job_daily, job_events, jobs,
                                metadata, queue_controls, schedules, schema_info, worker_runs)
from qkit.engine.lifecycle import ClaimPlan, Outcome, Runnable, SettlePlan, fingerprint, unstorable


class Ledger(HotPath, Reads, Overview, Admin, Interventions, Runs, Progress, Events, DashboardReads, Schedules,
             LimitRows, LedgerBase):
    """The ledger database, through SQLAlchemy 2 (SQLite in WAL mode, or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.driver = DriverSQL(self.dialect)

    def close(self) -> None:
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


__all__ = ["CLAIM_JOBS", "INSERT_ATTEMPT", "INSERT_EVENT", "INSERT_JOB", "MAX_TEXT", "MIGRATIONS", "NOT_DUE_SLACK",
           "RENEWAL_EVENT_WAIT_S", "SCHEMA_VERSION", "SELECT_CLAIM", "SELECT_FENCE", "SELECT_OPEN", "SETTLE_ATTEMPT",
           "SETTLE_JOB", "ClaimPlan", "DriverSQL", "EventWriter", "Ledger", "LedgerFailure", "Outcome", "Runnable", "SettlePlan",
           "fingerprint", "job_attempts", "job_daily", "job_events", "jobs", "metadata", "queue_controls", "schedules", "schema_info", "transient",
           "unstorable", "utcnow", "worker_runs"]

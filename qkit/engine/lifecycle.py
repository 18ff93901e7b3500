"""The job life-cycle (docs/semantics.md#retries-and-back-off): what becomes of a job when an attempt ends.

Pure: no SQL, no Redis, no clock.  The ledger records what :func:`decide`
says (:mod:`qkit.ledger.hotpath`), and dispatch carries the resulting
:class:`Settlement` out in Redis (:mod:`qkit.engine.dispatch`).  Both the claim path
(an attempt found lost when its lease was reclaimed) and the settle path (a
worker reporting how an attempt ended) ask the same function.

=========== ============================== =============== ==========
outcome     condition                      ledger status   Redis
=========== ============================== =============== ==========
completed   -                              completed       done
released    (the attempt does not count)   pending         retry, 0 ms
failed,     permanent (unknown type)       failed          dead
timeout,    no attempts left               failed          dead
lost        attempts left                  pending+run_at  retry, back-off
=========== ============================== =============== ==========
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qkit.engine.backoff import Backoff

#: how an attempt can end; "lost" is decided by a reclaimer, the rest by the worker that ran it
OUTCOMES = ("completed", "failed", "timeout", "released", "lost")


@dataclass
class Settlement:
    """What Redis must do with a job once the ledger has recorded its outcome."""

    job_id: int
    action: str  # 'done' | 'retry' | 'dead'
    delay_ms: int = 0
    priority: int = 0


@dataclass
class Runnable:
    """A claimed job the worker may run now (its attempt is recorded as open)."""

    id: int
    type: str
    payload: dict[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    epoch: int
    started_at: datetime


@dataclass
class Outcome:
    """How one attempt ended, as the worker reports it."""

    job: Runnable
    outcome: str  # completed | failed | timeout | released
    finished_at: datetime
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    permanent: bool = False  # no retry (unknown type)


@dataclass(frozen=True)
class Decision:
    """The life-cycle's verdict on one ended attempt."""

    status: str  # the job's ledger status next: 'completed' | 'pending' | 'failed'
    action: str  # the Redis settlement: 'done' | 'retry' | 'dead'
    reason: str  # 'completed' | 'released' | 'retry' | 'exhausted' | 'permanent'
    delay: float = 0.0  # seconds before the retry is due

    @property
    def dead(self) -> bool:
        return self.action == "dead"

    def settlement(self, job_id: int, priority: int) -> Settlement:
        if self.action == "done":
            return Settlement(job_id, "done")
        return Settlement(job_id, self.action, int(self.delay * 1000), priority)


COMPLETED = Decision("completed", "done", "completed")
RELEASED = Decision("pending", "retry", "released")


def decide(outcome: str, *, job_id: int, epoch: int, attempt: int, max_attempts: int, backoff: Backoff,
           permanent: bool = False) -> Decision:
    """The one rule for retry / dead-letter / permanent failure after attempt ``attempt`` ended.

    A failed, timed-out or lost attempt is retried after the back-off while the
    job has attempts left; a permanent failure (the worker has no handler for
    the type) and the last attempt go to the dead-letter queue.  A released
    attempt (the worker stopped before running it) does not count.
    """
    if outcome == "completed":
        return COMPLETED
    if outcome == "released":
        return RELEASED
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
    if permanent:
        return Decision("failed", "dead", "permanent")
    if attempt >= max_attempts:
        return Decision("failed", "dead", "exhausted")
    return Decision("pending", "retry", "retry", backoff.delay(job_id, epoch, attempt))


def resend(job_id: int, status: str | None, priority: int) -> Settlement:
    """The settlement that brings Redis in line with a job the ledger already holds as ``status``
    (None: no such job): its outcome was recorded but never reached Redis."""
    if status == "failed":
        return Settlement(job_id, "dead", 0, priority)
    if status in ("pending", "processing"):
        return Settlement(job_id, "retry", 0, priority)
    return Settlement(job_id, "done", 0, priority if status == "completed" else 0)


def lost_error(holder: str) -> str:
    """The error recorded on an attempt whose worker stopped renewing its lease."""
    return f"lost: worker {holder} stopped renewing its lease (process died or stalled)"


@dataclass
class ClaimPlan:
    runnable: list[Runnable] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)
    lost: int = 0
    retried: int = 0
    failed: int = 0


@dataclass
class SettlePlan:
    settlements: list[Settlement] = field(default_factory=list)
    fenced: list[int] = field(default_factory=list)
    completed: int = 0
    retried: int = 0
    failed: int = 0

    def merge(self, other: "SettlePlan") -> None:
        self.settlements += other.settlements
        self.fenced += other.fenced
        self.completed += other.completed
        self.retried += other.retried
        self.failed += other.failed


def unstorable(o: Outcome, exc: BaseException) -> Outcome:
    """The outcome recorded instead of one the ledger refused: failed, with a clean error and no job data."""
    return Outcome(o.job, "failed", o.finished_at, permanent=True,
                   error=f"OutcomeNotStored: the ledger refused this job's {o.outcome} outcome "
                         f"({type(exc).__name__}); its handler had finished")


_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.I)
_HEX = re.compile(r"\b(?:0x)?[0-9a-f]{8,}\b|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def fingerprint(error: str | None) -> str | None:
    """The error's type plus its message with numbers, ids and quoted values normalised
    (stored with each attempt; DLQ triage groups by it)."""
    if not error:
        return None
    text_ = _QUOTED.sub("'?'", error.splitlines()[0])
    text_ = _HEX.sub("<id>", text_)
    text_ = _NUMBER.sub("<n>", text_)
    return text_[:200]

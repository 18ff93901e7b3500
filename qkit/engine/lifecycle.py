"""The job life-cycle (docs/semantics.md#retries-and-back-off): what becomes of a job when an attempt ends.

Pure: no SQL, no Redis, no clock.  The ledger records what :func:`decide`
says (:mod:`qkit.ledger.hotpath`), and dispatch carries the resulting
:class:`Settlement` out in Redis (:mod:`qkit.engine.dispatch`).  Both the claim path
(an attempt found lost when its lease was reclaimed) and the settle path (a
worker reporting how an attempt ended) ask the same function.

=========== ============================== =============== ==========================
outcome     condition                      ledger status   Redis
=========== ============================== =============== ==========================
completed   -                              completed       done
released    (the attempt does not count)   pending         retry, 0 ms
failed,     permanent (unknown type,       failed          dead
timeout,    ``qkit.Permanent``)
lost        no attempts left               failed          dead
            attempts left, a delay named   pending+run_at  retry, min(named, cap)
            (``qkit.Retry``, Retry-After)
            attempts left                  pending+run_at  retry, back-off
any         its cancel was requested       cancelled       done
=========== ============================== =============== ==========================

A handler directs its attempt's outcome by what it raises (:func:`directive`):
``qkit.Retry(after=s)`` names the delay, ``qkit.Permanent`` ends the job, and an
``httpx.HTTPStatusError`` with status 429 or 503 and a ``Retry-After`` header
names the delay as the server gave it (docs/semantics.md#handler-outcomes).
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from qkit.engine.backoff import Backoff
from qkit.engine.fingerprints import fingerprint  # noqa: F401 - the attempts' error key, kept importable here

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
    #: its handler passed its timeout and was given up (what it reports from then on is ignored)
    abandoned: bool = False


@dataclass
class Outcome:
    """How one attempt ended, as the worker reports it."""

    job: Runnable
    outcome: str  # completed | failed | timeout | released
    finished_at: datetime
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    permanent: bool = False  # no retry (unknown type, qkit.Permanent)
    retry_after: float | None = None  # seconds the handler (or the server it called) asked to wait


@dataclass(frozen=True)
class Decision:
    """The life-cycle's verdict on one ended attempt."""

    status: str  # the job's ledger status next: 'completed' | 'pending' | 'failed' | 'cancelled'
    action: str  # the Redis settlement: 'done' | 'retry' | 'dead'
    reason: str  # 'completed' | 'released' | 'retry' | 'retry_after' | 'exhausted' | 'permanent' | 'cancelled'
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
CANCELLED = Decision("cancelled", "done", "cancelled")


def decide(outcome: str, *, job_id: int, epoch: int, attempt: int, max_attempts: int, backoff: Backoff,
           permanent: bool = False, retry_after: float | None = None,
           cancelled: bool = False) -> Decision:
    """The one rule for retry / dead-letter / permanent failure after attempt ``attempt`` ended.

    A failed, timed-out or lost attempt is retried after the back-off while the
    job has attempts left, or after ``retry_after`` seconds when the handler
    named a delay (capped by the back-off's cap, ``QKIT_BACKOFF_MAX``); a
    permanent failure (the worker has no handler for the type, or the handler
    raised ``qkit.Permanent``) and the last attempt go to the dead-letter queue.
    A released attempt (the worker stopped before running it) does not count.  A job whose cancel
    was requested while the attempt ran ends ``cancelled``, however the attempt ended
    (docs/semantics.md#cancel-pause-promote).
    """
    if cancelled:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
        return CANCELLED
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
    if retry_after is not None:
        return Decision("pending", "retry", "retry_after", min(backoff.cap, max(0.0, float(retry_after))))
    return Decision("pending", "retry", "retry", backoff.delay(job_id, epoch, attempt))


# ---------------------------------------------------------------- handler-directed outcomes
class Retry(Exception):
    """Raised by a handler: retry this job after ``after`` seconds (None: after the usual back-off).

    The attempt counts (the job is still bounded by ``max_attempts``) and the
    delay is capped by ``QKIT_BACKOFF_MAX``.  ``reason`` is stored with the
    attempt's error, like an exception's message.
    """

    def __init__(self, after: float | None = None, reason: str = "") -> None:
        if after is not None and (isinstance(after, bool) or not isinstance(after, (int, float))
                                  or not 0 <= after < math.inf):
            raise ValueError(f"qkit.Retry: after must be a number of seconds >= 0 or None (got {after!r})")
        self.after = None if after is None else float(after)
        self.reason = str(reason or "")
        when = "after the back-off" if self.after is None else f"after {self.after:g} s"
        super().__init__(f"the handler asked to retry {when}" + (f": {self.reason}" if self.reason else ""))


class Permanent(Exception):
    """Raised by a handler: this job cannot succeed; it goes to the DLQ now, with no more attempts."""


#: HTTP statuses whose ``Retry-After`` header names the retry delay
RETRY_AFTER_STATUSES = (429, 503)
_SECONDS = re.compile(r"\s*(\d{1,12}(?:\.\d{1,6})?)\s*")


def parse_retry_after(value: str | None, now: datetime, date: str | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds, or an HTTP-date.

    An HTTP-date counts from the response's ``Date`` header when it has one
    (both are the server's clock, so this host's clock does not matter), else
    from ``now``.  A date in the past means 0; a value that is neither form, None.
    """
    if not value:
        return None
    m = _SECONDS.fullmatch(value)
    if m:
        return float(m.group(1))
    try:
        at = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if at is None:
        return None
    reference = now
    if date:
        try:
            reference = parsedate_to_datetime(date.strip()) or now
        except (TypeError, ValueError, IndexError):
            reference = now
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    if reference.tzinfo is None:
        reference = reference.replace(tzinfo=timezone.utc)
    return max(0.0, (at - reference).total_seconds())


@dataclass(frozen=True)
class Directive:
    """What the exception a handler raised asks of its attempt's outcome."""

    permanent: bool = False
    retry_after: float | None = None


NO_DIRECTIVE = Directive()


def directive(exc: BaseException | None, now: datetime) -> Directive:
    """``qkit.Permanent``: permanent; ``qkit.Retry(after=)``: that delay; an ``httpx.HTTPStatusError``
    of status 429 or 503 with a ``Retry-After`` header: the header's delay; anything else: none."""
    if exc is None:
        return NO_DIRECTIVE
    if isinstance(exc, Permanent):
        return Directive(permanent=True)
    if isinstance(exc, Retry):
        return Directive(retry_after=exc.after)
    httpx = sys.modules.get("httpx")  # not imported: no exception of it can have been raised
    if httpx is not None and isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        if response.status_code in RETRY_AFTER_STATUSES:
            after = parse_retry_after(response.headers.get("retry-after"), now, response.headers.get("date"))
            if after is not None:
                return Directive(retry_after=after)
    return NO_DIRECTIVE


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
    cancelled: int = 0


@dataclass
class SettlePlan:
    settlements: list[Settlement] = field(default_factory=list)
    fenced: list[int] = field(default_factory=list)
    completed: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    released: int = 0  # handed back unrun (a stopping burst): not an attempt, not a retry

    def merge(self, other: "SettlePlan") -> None:
        self.settlements += other.settlements
        self.fenced += other.fenced
        self.completed += other.completed
        self.retried += other.retried
        self.failed += other.failed
        self.cancelled += other.cancelled
        self.released += other.released


def unstorable(o: Outcome, exc: BaseException) -> Outcome:
    """The outcome recorded instead of one the ledger refused: failed, with a clean error and no job data."""
    return Outcome(o.job, "failed", o.finished_at, permanent=True,
                   error=f"OutcomeNotStored: the ledger refused this job's {o.outcome} outcome "
                         f"({type(exc).__name__}); its handler had finished")

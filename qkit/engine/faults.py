"""Crash points for fault-injection tests.

``QKIT_CRASH_AT=<point>`` (or ``<point>:<n>``) makes the process SIGKILL
itself the first (or n-th) time it reaches ``<point>``: no ``finally``, no
``atexit``, no flush, as when the machine loses power.  The points sit
between the two writes of a step, where a crash is worth testing:

=======================  ==========================================================
``enqueue.after_ledger``  the job rows are committed; the Redis push has not run
``claim.after_redis``     Redis leased the batch; the ledger has not recorded it
``claim.after_ledger``    the ledger recorded the claim; no handler has run
``complete.before_ledger`` handlers returned; their outcomes are not committed
``complete.after_ledger`` a completion is committed; Redis still holds the lease
``retry.after_ledger``    a retry is committed; Redis still holds the lease
``dead.after_ledger``     a dead-lettering is committed; Redis still holds the lease
``tick.after_ledger``     a schedule's fire and its jobs are committed; they are not pushed to Redis
=======================  ==========================================================

When the variable is unset, :data:`ARMED` is False and call sites skip the
call (``if faults.ARMED: faults.reach(...)``): the hot path pays one global
lookup.
"""
from __future__ import annotations

import os
import signal
import sys

from qkit.errors import ConfigError

POINTS = ("enqueue.after_ledger", "claim.after_redis", "claim.after_ledger", "complete.before_ledger",
          "complete.after_ledger", "retry.after_ledger", "dead.after_ledger", "tick.after_ledger")


def _parse(raw: str | None) -> tuple[str | None, int]:
    if not raw:
        return None, 0
    point, _, nth = raw.strip().partition(":")
    if point not in POINTS:
        raise ConfigError(f"QKIT_CRASH_AT={raw!r}: unknown crash point; use one of {', '.join(POINTS)}")
    if nth and not (nth.isdigit() and int(nth) >= 1):
        raise ConfigError(f"QKIT_CRASH_AT={raw!r}: the count after ':' must be a whole number >= 1")
    return point, int(nth or 1)


_RAW = os.environ.get("QKIT_CRASH_AT") or None
ARMED: bool = _RAW is not None
_point: str | None = None
_left = 0


def arm() -> None:
    """Parse ``QKIT_CRASH_AT``; a malformed value raises :class:`ConfigError` (one CLI line).

    Called before a burst or an enqueue writes anything, so a typo cannot
    strand a half-done step.
    """
    global _point, _left
    if _point is None:
        _point, _left = _parse(_RAW)


def reach(*points: str) -> None:
    """SIGKILL this process if the armed crash point is among ``points`` and its count is reached."""
    global _left
    arm()
    if _point not in points:
        return
    _left -= 1
    if _left == 0:
        sys.stderr.write(f"qkit: crash point {_point} reached: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

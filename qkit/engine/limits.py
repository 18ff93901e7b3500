"""Limits per job type, the pure part: what a limit is, its checks, and how to measure one was kept.

A limit says at most ``rate`` attempts of a type start per ``per`` seconds and
at most ``concurrency`` run at once, across every worker of a queue.  The claim
script enforces it on Redis's clock (``qkit/lua/_limits.lua``); the ledger's
``queue_controls`` rows (kind ``limit``) hold it; :mod:`qkit.ops.limits` sets and
restores it.  See docs/semantics.md#limits-per-type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from qkit.errors import BadInput
from qkit.model import check_name

MAX_RATE = 1_000_000
MAX_CONCURRENCY = 100_000
#: a window longer than a day would keep a type held for more than a day after a burst
MAX_PER_S = 86_400.0
MIN_PER_S = 0.001  # the claim counts whole milliseconds of Redis TIME


@dataclass(frozen=True)
class Limit:
    """One type's limit; None: no limit of that kind."""

    rate: int | None
    per: float
    concurrency: int | None

    @property
    def per_ms(self) -> int:
        return max(1, round(self.per * 1000))

    def spec(self) -> str:
        """The claim script's form: ``'<rate> <per_ms> <concurrency>'`` (0: none)."""
        return f"{self.rate or 0} {self.per_ms} {self.concurrency or 0}"

    def to_value(self) -> dict[str, Any]:
        """The ledger's and the API's form."""
        return {"rate": self.rate, "per": self.per, "concurrency": self.concurrency}

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> "Limit":
        """A stored value, checked again (a row edited by hand is refused in one line)."""
        if not isinstance(value, Mapping):
            raise BadInput("a stored limit is not a JSON object")
        return check_limit(value.get("rate"), value.get("per", 60.0), value.get("concurrency"))

    def describe(self) -> str:
        parts = []
        if self.rate is not None:
            parts.append(f"{self.rate} per {self.per:g} s")
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} at once")
        return ", ".join(parts)


def _int(value: Any, what: str, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{what} must be a whole number (got {value!r})")
    if not 1 <= value <= high:
        raise BadInput(f"{what} must be 1..{high} (got {value})")
    return value


def check_limit(rate: Any = None, per: Any = 60.0, concurrency: Any = None) -> Limit:
    """A valid :class:`Limit`, or BadInput saying what is wrong and why."""
    if rate is None and concurrency is None:
        raise BadInput("a limit needs a rate, a concurrency, or both")
    if rate is not None:
        rate = _int(rate, "rate", MAX_RATE)
    if isinstance(per, bool) or not isinstance(per, (int, float)) or not math.isfinite(per):
        raise BadInput(f"per must be a number of seconds (got {per!r})")
    if not MIN_PER_S <= per <= MAX_PER_S:
        raise BadInput(f"per must be {MIN_PER_S:g}..{MAX_PER_S:g} seconds (got {per:g})")
    if concurrency is not None:
        concurrency = _int(concurrency, "concurrency", MAX_CONCURRENCY)
    return Limit(rate, float(per), concurrency)


def check_type(job_type: Any) -> str:
    return check_name(job_type, "job type")


# ---------------------------------------------------------------- measuring a limit from what ran
def peak_starts(starts: Iterable[float], per: float) -> int:
    """The most starts (seconds) in any window ``[t, t + per)``: what a rate limit bounds."""
    times = sorted(starts)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - per:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals ``[start, end)`` open at one instant: what a concurrency limit bounds.

    An interval ending when another starts does not overlap it; one without an
    end (still running) is open to the end of time.
    """
    events = []
    for start, end in intervals:
        events.append((start, 1))
        if end is not None:
            events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # at one instant, ends before starts
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best

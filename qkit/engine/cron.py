"""Fire times of recurring schedules: which are due at a given ``now`` (docs/semantics.md#schedules).

Pure functions, no I/O and no clock: the caller passes ``now`` (Redis's clock in
:meth:`qkit.engine.schedules.ScheduleMethods.tick`, a made-up instant in the unit tests).
Fire times come from croniter in the schedule's ``zoneinfo`` time zone and are
handled as aware UTC datetimes, whole seconds.

Daylight-saving changes behave as croniter makes them: a local time that does
not exist (in the spring-forward gap) fires once at the first instant after the
gap (``30 2 * * *`` in Europe/Berlin fires at 03:00 CEST on the last Sunday of
March; ``*/30`` loses its 02:00 and 02:30 fires to one at 03:00); a local time
that happens twice (fall-back) fires twice, once in each offset.

croniter is imported on first use: ``import qkit`` and a burst with no schedule due never load it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from qkit.errors import BadInput

#: how a schedule treats fire times that passed while no burst or tick ran (docs/semantics.md#schedules)
CATCH_UP = ("latest", "all", "skip")
#: ``catch_up="all"``: at most this many jobs per schedule per tick, the latest fire times (older ones are skipped)
MAX_CATCH_UP = 100
#: fire times walked one by one per tick; a longer gap jumps to its end (``Due.skipped`` is then None)
SCAN_LIMIT = 1000
MAX_CRON_LENGTH = 256  # the ledger's column


@dataclass(frozen=True)
class Due:
    """What one tick does for one schedule."""

    fires: tuple[datetime, ...]  # fire times to enqueue now, oldest first (each one job)
    next_fire_at: datetime  # the schedule's first fire time after ``now``
    skipped: int | None  # due fire times not enqueued (catch_up rules); None: more than SCAN_LIMIT passed


def check_cron(expr: Any) -> str:
    """A cron expression croniter reads (five fields, or six with seconds last); raise BadInput otherwise."""
    if not isinstance(expr, str) or not expr.strip():
        raise BadInput("cron must be a non-empty string such as '*/5 * * * *'")
    expr = " ".join(expr.split())
    if len(expr) > MAX_CRON_LENGTH:
        raise BadInput(f"cron expression is longer than {MAX_CRON_LENGTH} characters")
    _iterate(expr, "UTC", datetime(2000, 1, 1, tzinfo=timezone.utc))
    return expr


def check_tz(name: Any) -> str:
    """An IANA time-zone name ``zoneinfo`` knows (``UTC``, ``Europe/Berlin``); raise BadInput otherwise."""
    if not isinstance(name, str) or not name:
        raise BadInput("tz must be an IANA time-zone name such as 'Europe/Berlin'")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise BadInput(f"time zone {name[:64]!r} is unknown: use an IANA name such as 'Europe/Berlin' or 'UTC'") \
            from None
    return name


def check_catch_up(value: Any) -> str:
    if value not in CATCH_UP:
        raise BadInput(f"catch_up {value!r} is invalid: use one of {', '.join(CATCH_UP)}")
    return value


def _iterate(cron: str, tz: str, start: datetime) -> Any:
    """croniter over ``cron`` in zone ``tz`` from ``start``; BadInput for a stored definition this
    installation cannot read (a time zone gone from tzdata, an expression a newer croniter refuses)."""
    from croniter import CroniterError, croniter

    try:
        return croniter(cron, start.astimezone(ZoneInfo(tz)))
    except (ZoneInfoNotFoundError, OSError):
        raise BadInput(f"time zone {tz[:64]!r} is unknown to this installation's tzdata") from None
    except (CroniterError, ValueError, TypeError, KeyError) as exc:
        raise BadInput(f"cron expression {cron!r} is invalid: {_first_line(exc)}") from None


def next_after(cron: str, tz: str, t: datetime) -> datetime:
    """The first fire time strictly after ``t`` (aware), in UTC; BadInput if the expression never fires."""
    from croniter import CroniterBadDateError

    try:
        nxt = _iterate(cron, tz, t).get_next(datetime)
    except CroniterBadDateError:
        raise BadInput(f"cron expression {cron!r} has no fire time after {t:%Y-%m-%d %H:%M:%S} UTC") from None
    return nxt.astimezone(timezone.utc)


def latest_fires(cron: str, tz: str, now: datetime, n: int) -> list[datetime]:
    """The ``n`` latest fire times at or before ``now``, oldest first."""
    from croniter import CroniterBadDateError

    # croniter's get_prev is strictly before its start; fire times are whole seconds
    it = _iterate(cron, tz, now.replace(microsecond=0) + timedelta(seconds=1))
    out = []
    for _ in range(n):
        try:
            out.append(it.get_prev(datetime).astimezone(timezone.utc))
        except CroniterBadDateError:
            break
    return out[::-1]


def due(cron: str, tz: str, next_fire_at: datetime, now: datetime, catch_up: str) -> Due:
    """The fire times from ``next_fire_at`` (the first not yet enqueued) up to ``now`` and what to do with them.

    ``latest``: one job, for the latest of them; ``all``: one job each, at most
    :data:`MAX_CATCH_UP` (the latest); ``skip``: a job only when exactly one fire
    time passed (the tick came before the fire time after it), none after a gap.
    """
    check_catch_up(catch_up)
    passed: list[datetime] = []
    t = next_fire_at
    while t <= now and len(passed) < SCAN_LIMIT:
        passed.append(t)
        t = next_after(cron, tz, t)
    if not passed:
        return Due((), next_fire_at, 0)
    if t <= now:  # a longer gap than we walk: its last fire times, backwards from now
        nxt = next_after(cron, tz, now)
        tail = latest_fires(cron, tz, now, MAX_CATCH_UP if catch_up == "all" else 1) or passed[-1:]
        fires = tuple(tail) if catch_up != "skip" else ()
        return Due(fires, nxt, None)
    if catch_up == "latest":
        fires = (passed[-1],)
    elif catch_up == "all":
        fires = tuple(passed[-MAX_CATCH_UP:])
    else:
        fires = tuple(passed) if len(passed) == 1 else ()
    return Due(fires, t, len(passed) - len(fires))


def job_key(name: str, fire: datetime) -> str:
    """The idempotency key of a schedule's job for one fire time: the ledger's unique index holds it once."""
    return f"schedule:{name}@{fire.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


__all__ = ["CATCH_UP", "MAX_CATCH_UP", "SCAN_LIMIT", "Due", "check_catch_up",
           "check_cron", "check_tz", "due", "job_key", "latest_fires", "next_after"]

"""Retention: prune old completed jobs, keep daily roll-ups (``qkit prune``).

``prune(q, "30d")`` deletes the completed jobs of a queue that finished
before midnight UTC of the day 30 days ago — the job rows, their attempts and
their events — in batches, one transaction each.  The same transaction adds
the batch to ``job_daily`` (one row per day, queue and type: counts, attempt
outcomes, summed durations and mergeable histograms, from which the p50/p95
columns are recomputed), so the roll-ups always match what was deleted and a
crash mid-prune loses nothing.  Whole UTC days only: a day is pruned in one
run, never half.

Never touched: failed jobs (the DLQ is only emptied by ``qkit dlq purge``),
pending and processing jobs, cancelled jobs (``job_daily`` has no column to roll
them up), worker runs.

:func:`daily` gives the analyst one frame per (day, type) over the whole
history: the roll-ups of pruned days plus the same figures computed live
from the rows still in the ledger.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Iterable

from qkit.errors import BadInput
from qkit.ledger import admin, utcnow

if TYPE_CHECKING:
    import pandas as pd

    from qkit.engine.queue import Queue

#: histogram buckets grow by 5 %: a percentile read from one is within ~2.5 % of the true value
BUCKET_RATIO = 1.05
_LOG_RATIO = math.log(BUCKET_RATIO)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: the longest age: older than this is older than any job (and past it dates overflow)
MAX_AGE = timedelta(days=100 * 366)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)


def parse_age(value: str | float | timedelta) -> timedelta:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"3600s"``, ``"2w"`` (or a timedelta, or days as a number)."""
    if isinstance(value, timedelta):
        age = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not float(value) <= MAX_AGE.days:  # also NaN
            raise BadInput(f"age {value!r} days is longer than {MAX_AGE.days} days")
        age = timedelta(days=float(value))
    else:
        m = _AGE.match(str(value))
        if not m:
            raise BadInput(f"age {value!r} is not like 30d, 12h, 90m, 3600s or 2w")
        seconds = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if not seconds <= MAX_AGE.total_seconds():
            raise BadInput(f"age {value!r} is longer than {MAX_AGE.days} days")
        age = timedelta(seconds=seconds)
    if age > MAX_AGE:
        raise BadInput(f"age {value!r} is longer than {MAX_AGE.days} days")
    if age <= timedelta(0):
        raise BadInput(f"age {value!r} must be positive")
    return age


def dlq_age(value: Any) -> timedelta:
    """``older_than`` of a DLQ purge: seconds (a number), a timedelta, or text like ``"7d"``, ``"12h"``."""
    if isinstance(value, str):
        return parse_age(value)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise BadInput(f"older_than must be seconds or an age like 7d or 12h, not {type(value).__name__}")
    if not 0 <= seconds <= MAX_AGE.total_seconds():  # also NaN
        raise BadInput(f"older_than must be 0..{MAX_AGE.days} days in seconds, not {value!r}")
    return timedelta(seconds=seconds)


def cutoff_for(age: timedelta, now: datetime | None = None) -> datetime:
    """Midnight UTC of the day ``age`` ago: jobs finished before it are prunable (whole days only)."""
    moment = (now or utcnow()) - age
    return moment.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


# ---------------------------------------------------------------- histograms
def bucket(ms: float) -> int:
    """Log bucket of a duration: 0 for < 1 ms, then 5 % wide buckets."""
    return 0 if ms < 1 else 1 + int(math.log(ms) / _LOG_RATIO)


def bucket_value(b: int) -> float:
    """The representative (geometric middle) of a bucket, ms."""
    return 0.5 if b <= 0 else BUCKET_RATIO ** (b - 0.5)


def hist_merge(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int]:
    out = dict(a or {})
    for k, v in (b or {}).items():
        out[k] = out.get(k, 0) + int(v)
    return out


def hist_percentile(hist: dict[str, int] | None, p: float) -> float | None:
    """The p-quantile (0..1) of a histogram, as its bucket's representative value."""
    if not hist:
        return None
    total = sum(hist.values())
    rank = max(1, math.ceil(p * total))
    seen = 0
    for b in sorted(hist, key=int):
        seen += hist[b]
        if seen >= rank:
            return round(bucket_value(int(b)), 3)
    return None


def _hist(values: Iterable[float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        k = str(bucket(v))
        out[k] = out.get(k, 0) + 1
    return out


# ---------------------------------------------------------------- roll-ups
@dataclass
class _Day:
    """The roll-up of some completed jobs of one (day, queue, type)."""

    completed: int = 0
    attempts: int = 0
    retried: int = 0
    failed_attempts: int = 0
    timeout_attempts: int = 0
    lost_attempts: int = 0
    total_duration_ms: float = 0.0
    exec_ms_sum: float = 0.0
    wait_ms_sum: float = 0.0
    exec_ms: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)


def _day_of(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d")


def _rollup(job_rows: list[Any], attempt_rows: list[Any]) -> dict[tuple[str, str, str], _Day]:
    """Roll up completed jobs (and all their attempts) per (day finished, queue, type)."""
    days: dict[tuple[str, str, str], _Day] = {}
    info: dict[int, tuple[str, str, str]] = {}
    for r in job_rows:
        key = (_day_of(r.finished_at), r.queue, r.type)
        info[r.id] = key
        d = days.setdefault(key, _Day())
        d.completed += 1
        if r.started_at is not None and r.created_at is not None:
            wait = max(0.0, (r.started_at - r.created_at).total_seconds() * 1000)
            d.wait_ms_sum += wait
            d.wait_ms.append(wait)
    per_job: dict[int, int] = {}
    for r in attempt_rows:
        d = days[info[r.job_id]]
        per_job[r.job_id] = per_job.get(r.job_id, 0) + 1
        d.attempts += 1
        ms = float(r.duration_ms or 0.0)
        d.total_duration_ms += ms
        if r.outcome == "completed":
            d.exec_ms_sum += ms
            d.exec_ms.append(ms)
        elif r.outcome in ("failed", "timeout", "lost"):
            setattr(d, f"{r.outcome}_attempts", getattr(d, f"{r.outcome}_attempts") + 1)
    for job_id, n in per_job.items():
        if n > 1:
            days[info[job_id]].retried += 1
    return days


_SUMS = ("completed", "attempts", "retried", "failed_attempts", "timeout_attempts", "lost_attempts",
         "total_duration_ms", "exec_ms_sum", "wait_ms_sum")


def _merged(d: _Day, old: Any, now: datetime) -> dict[str, Any]:
    """The ``job_daily`` values of roll-up ``d`` added to the row ``old`` (or None): sums add up,
    histograms merge, percentiles are recomputed."""
    hists = {"exec": _hist(d.exec_ms), "wait": _hist(d.wait_ms)}
    if old is not None:
        before = old["histograms"] or {}
        hists = {k: hist_merge(before.get(k), v) for k, v in hists.items()}
    values: dict[str, Any] = {name: getattr(d, name) + (old[name] if old is not None else 0) for name in _SUMS}
    values.update(exec_p50_ms=hist_percentile(hists["exec"], 0.5), exec_p95_ms=hist_percentile(hists["exec"], 0.95),
                  wait_p50_ms=hist_percentile(hists["wait"], 0.5), wait_p95_ms=hist_percentile(hists["wait"], 0.95),
                  histograms=hists, updated_at=now)
    return values


# ---------------------------------------------------------------- prune
@dataclass
class PruneReport:
    """What :func:`prune` did (or would do, with ``dry_run``)."""

    queue: str
    cutoff: datetime
    jobs: int = 0
    attempts: int = 0
    events: int = 0
    batches: int = 0
    days: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "cutoff": self.cutoff.isoformat(), "jobs": self.jobs, "attempts": self.attempts,
                "events": self.events, "batches": self.batches, "days": self.days, "dry_run": self.dry_run}


def prune(q: "Queue", older_than: str | float | timedelta = "30d", *, batch_size: int = 500,
          now: datetime | None = None, dry_run: bool = False) -> PruneReport:
    """Delete completed jobs of this queue that finished before the cutoff day, keeping daily roll-ups.

    ``older_than``: ``"30d"``-style text, a timedelta, or days.  The cutoff is
    midnight UTC of the day that long ago.  Each batch (``batch_size`` jobs)
    is one transaction: roll-ups added, events, attempts and job rows deleted.
    Failed jobs (the DLQ) are never pruned.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 10_000:
        raise BadInput("batch_size must be an integer 1..10000")
    now = now or utcnow()
    cutoff = cutoff_for(parse_age(older_than), now)
    report = PruneReport(queue=q.name, cutoff=cutoff, dry_run=dry_run)
    days: set[str] = set()
    if dry_run:
        report.jobs, report.attempts, report.events, finished = admin.prunable_counts(q.ledger, q.name, cutoff)
        report.days = sorted({_day_of(f) for f in finished})
        return report
    while True:
        done = admin.prune_batch(q.ledger, q.name, cutoff, batch_size, _rollup,
                                 lambda d, old: _merged(d, old, now))
        if done is None:
            break
        rolled, events, attempts, n_jobs = done
        report.events += events
        report.attempts += attempts
        report.jobs += n_jobs
        report.batches += 1
        days |= {k[0] for k in rolled}
    report.days = sorted(days)
    return report


# ---------------------------------------------------------------- the whole history
def daily(q: "Queue", *, since: Any = None) -> "pd.DataFrame":
    """Completed jobs per (day, type) over the whole history: pruned days from ``job_daily``, the rest live.

    Columns: ``day`` (UTC date string), ``type``, ``completed``, ``attempts``,
    ``retried``, ``failed_attempts``, ``timeout_attempts``, ``lost_attempts``,
    ``total_duration_ms``, ``exec_ms_sum``, ``exec_p50_ms``, ``exec_p95_ms``,
    ``wait_ms_sum``, ``wait_p50_ms``, ``wait_p95_ms``, ``pruned`` (True when
    the figures come from roll-ups only).  Live days are computed with the
    same log-bucket histograms as the roll-ups, so both halves compare.
    ``since``: a date/time (or ISO text); days before it are left out.
    """
    import pandas as pd

    columns = ["day", "type", *_SUMS[:6], "total_duration_ms", "exec_ms_sum", "exec_p50_ms", "exec_p95_ms",
               "wait_ms_sum", "wait_p50_ms", "wait_p95_ms", "pruned"]
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    stored, chunks = admin.completed_history(q.ledger, q.name)
    for r in stored:
        merged[(r["day"], r["type"])] = {**{k: r[k] for k in _SUMS}, "hists": r["histograms"] or {}, "pruned": True}
    for job_rows, attempt_rows in chunks:
        for (day, _queue, type_), d in _rollup(job_rows, attempt_rows).items():
            row = merged.setdefault((day, type_), {**{k: 0 for k in _SUMS}, "hists": {}, "pruned": True})
            for k in _SUMS:
                row[k] += getattr(d, k)
            row["hists"] = {"exec": hist_merge(row["hists"].get("exec"), _hist(d.exec_ms)),
                            "wait": hist_merge(row["hists"].get("wait"), _hist(d.wait_ms))}
            row["pruned"] = False
    out = []
    for (day, type_), row in sorted(merged.items()):
        h = row.pop("hists")
        out.append({"day": day, "type": type_, **row,
                    "exec_p50_ms": hist_percentile(h.get("exec"), 0.5),
                    "exec_p95_ms": hist_percentile(h.get("exec"), 0.95),
                    "wait_p50_ms": hist_percentile(h.get("wait"), 0.5),
                    "wait_p95_ms": hist_percentile(h.get("wait"), 0.95)})
    df = pd.DataFrame(out, columns=columns)
    if since is not None and not df.empty:
        from qkit.utc import as_utc

        start_day = _day_of(as_utc(since))
        df = df[df["day"] >= start_day].reset_index(drop=True)
    return df

"""The analyst's edge: DLQ triage by error fingerprint, and the starvation view.

* :func:`dlq_groups` — the DLQ grouped by (fingerprint, type): counts, first
  and last failure, a sample error and payload.  The fingerprint is the one
  stored on the job's final attempt (``job_attempts.fingerprint``: exception
  type + message with numbers, ids and quoted values normalised, see
  :func:`qkit.engine.lifecycle.fingerprint`); ``fingerprint_id`` is a short stable hash
  of it, easy to type: ``qkit dlq replay --fingerprint 3f2a9c01be``.
* :func:`replay_fingerprint` — bulk replay of one group.
* :func:`purge_selection` — what a filtered DLQ purge deletes (fingerprint, age, ids).
* :func:`starvation` / :func:`starvation_frame` — wait from enqueue to first
  claim per priority (percentiles) and the oldest job waiting per priority:
  the view that shows a low priority starving (``q.stats()["starvation"]``).
"""
from __future__ import annotations

import hashlib
import math
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Sequence

from qkit.errors import BadInput, NotFound
from qkit.engine.lifecycle import fingerprint as error_fingerprint
from qkit.engine.limits import peak_overlap, peak_starts
from qkit.ledger import reads, utcnow
from qkit.utc import as_utc

if TYPE_CHECKING:
    import pandas as pd

    from qkit.engine.queue import Queue

NO_ERROR = "(no error recorded)"
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)

#: how many of the most recently created claimed jobs the wait percentiles cover (a bounded read)
WAIT_SAMPLE = 10_000


def fingerprint_id(fp: str | None) -> str:
    """A short, stable id of a fingerprint (10 hex digits of its SHA-1)."""
    return hashlib.sha1((fp or NO_ERROR).encode("utf-8")).hexdigest()[:10]


def _dlq_rows(q: "Queue") -> list[dict[str, Any]]:
    """Failed jobs of the queue with the fingerprint of their final attempt (one query)."""
    rows = reads.dead_with_fingerprints(q.ledger, q.name)
    for r in rows:
        # rows written before fingerprints were stored: the same function on the job's final error
        r["fingerprint"], r["fingerprint_id"] = _keys(r)
    return rows


def group_rows(q: "Queue") -> list[dict[str, Any]]:
    """The DLQ grouped by error fingerprint and job type, as dicts (no pandas): the columns of
    :func:`dlq_groups`, largest group first, then the latest failure."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in _dlq_rows(q):
        groups.setdefault((r["fingerprint"], r["type"]), []).append(r)
    out = []
    for (fp, type_), members in groups.items():
        times = [m["finished_at"] for m in members if m["finished_at"] is not None]
        sample = max(members, key=lambda m: (m["finished_at"] or _EARLIEST, m["id"]))
        out.append({"fingerprint_id": fingerprint_id(fp), "fingerprint": fp, "type": type_, "jobs": len(members),
                    "first_seen": min(times) if times else None, "last_seen": max(times) if times else None,
                    "sample_id": sample["id"], "sample_error": sample["error"], "sample_payload": sample["payload"],
                    "job_ids": [m["id"] for m in members]})
    return sorted(out, key=lambda g: (-g["jobs"], -(g["last_seen"] or _EARLIEST).timestamp(), g["type"]))


def dlq_groups(q: "Queue") -> "pd.DataFrame":
    """The DLQ grouped by error fingerprint and job type, largest group first (:func:`group_rows` as a DataFrame).

    Columns: ``fingerprint_id``, ``fingerprint``, ``type``, ``jobs``,
    ``first_seen``, ``last_seen`` (UTC, when the group's jobs failed),
    ``sample_id``, ``sample_error``, ``sample_payload`` (of the most recent
    failure) and ``job_ids`` (a list, oldest first).
    """
    import pandas as pd

    columns = ["fingerprint_id", "fingerprint", "type", "jobs", "first_seen", "last_seen", "sample_id",
               "sample_error", "sample_payload", "job_ids"]
    rows = group_rows(q)
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows, columns=columns)
    for col in ("first_seen", "last_seen"):
        df[col] = pd.to_datetime(df[col], utc=True)
    return df.sort_values(["jobs", "last_seen", "type"], ascending=[False, False, True]).reset_index(drop=True)


def dead_rows(q: "Queue", limit: int | None = None) -> list[dict[str, Any]]:
    """The DLQ's jobs, newest failure first, each with its ``fingerprint`` and ``fingerprint_id``."""
    jobs = q.dead(limit)
    keys = {r["id"]: _keys(r) for r in q.ledger.dead_candidates(q.name, ids=[j.id for j in jobs])} if jobs else {}
    out = []
    for job in jobs:
        fp, fp_id = keys.get(job.id) or _keys({"fingerprint": None, "error": job.error})
        out.append({**job.to_dict(), "fingerprint": fp, "fingerprint_id": fp_id})
    return out


def check_fingerprint(fp: Any) -> str:
    """``fp`` stripped; BadInput when it is empty or not text."""
    fp = fp.strip() if isinstance(fp, str) else ""
    if not fp:
        raise BadInput("a fingerprint (or its short id from `qkit dlq list --group`) is required")
    return fp


def fingerprint_job_ids(q: "Queue", fp: str, *, type: str | None = None) -> list[int]:
    """Ids of the DLQ jobs whose final error has fingerprint ``fp`` (the full text or its short id)."""
    fp = check_fingerprint(fp)
    return [r["id"] for r in _dlq_rows(q)
            if fp in (r["fingerprint"], r["fingerprint_id"]) and (type is None or r["type"] == type)]


def replay_fingerprint(q: "Queue", fp: str, *, type: str | None = None) -> list[int]:
    """Replay every DLQ job of one fingerprint group (optionally one type); returns the ids replayed.

    Raises NotFound when no DLQ job has that fingerprint.  Replays go in
    chunks of 500, each all-or-nothing (a job replayed meanwhile by someone
    else makes its chunk refuse; run it again).
    """
    ids = fingerprint_job_ids(q, fp, type=type)
    if not ids:
        raise NotFound(f"no job in the DLQ of queue {q.name!r} has fingerprint {fp!r}")
    done: list[int] = []
    for start in range(0, len(ids), 500):
        done += q.replay(ids[start:start + 500])
    return done


def purge_selection(q: "Queue", *, ids: Sequence[int] | None = None, fingerprint: str | None = None,
                    older_than: timedelta | None = None) -> list[tuple[int, int]]:
    """(id, epoch) of the DLQ jobs a filtered purge deletes: those among ``ids``, whose final error has
    ``fingerprint`` (text or short id) and that failed more than ``older_than`` ago, each when given."""
    fp = None if fingerprint is None else check_fingerprint(fingerprint)
    before = utcnow() - older_than if older_than is not None else None
    rows = q.ledger.dead_candidates(q.name, before=before, ids=ids)
    if fp is not None:
        rows = [r for r in rows if fp in _keys(r)]
    return [(int(r["id"]), int(r["epoch"])) for r in rows]


def _keys(row: dict[str, Any]) -> tuple[str, str]:
    """A DLQ row's fingerprint as stored (or, for rows written before fingerprints, computed from its
    error) and its short id."""
    fp = row["fingerprint"] or error_fingerprint(row["error"]) or NO_ERROR
    return fp, fingerprint_id(fp)


# ---------------------------------------------------------------- starvation
def _pct(values: list[float], p: float) -> float | None:
    """Percentile with linear interpolation (pandas' default), without pandas."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def starvation(q: "Queue", *, now: datetime | None = None) -> dict[str, Any]:
    """Per priority (highest first): how long jobs waited for their first claim, and who waits now.

    ``by_priority`` rows: ``priority``, ``claimed`` (jobs in the sample that
    were claimed), ``wait_p50_s``, ``wait_p95_s``, ``wait_max_s`` (enqueue to
    first claim, over the most recent ``WAIT_SAMPLE`` claimed jobs), ``waiting``
    (pending and due now), ``oldest_waiting_id`` and ``oldest_waiting_s``
    (how long the longest-waiting due job has been due).  ``aging_s`` is
    the queue's priority-aging setting (0: strict priority, so a steady flow
    of higher priorities can starve lower ones; see ``QKIT_PRIORITY_AGING_SECONDS``).
    """
    now = now or utcnow()
    claimed, firsts = reads.claim_waits(q.ledger, q.name, now, WAIT_SAMPLE)
    waiting = [(r.priority, r.n) for r in firsts]
    oldest: dict[int, tuple[int, datetime]] = {r.priority: (r.id, as_utc(r.run_at)) for r in firsts}
    waits: dict[int, list[float]] = {}
    for priority, created, started, _type in claimed:
        waits.setdefault(priority, []).append(max(0.0, (started - created).total_seconds()))
    counts = {p: int(n) for p, n in waiting}
    rows = []
    for priority in sorted(set(waits) | set(counts), reverse=True):
        w = waits.get(priority, [])
        old = oldest.get(priority)
        rows.append({
            "priority": priority, "claimed": len(w),
            "wait_p50_s": _round(_pct(w, 0.50)), "wait_p95_s": _round(_pct(w, 0.95)),
            "wait_max_s": _round(max(w) if w else None),
            "waiting": counts.get(priority, 0),
            "oldest_waiting_id": old[0] if old else None,
            "oldest_waiting_s": _round((now - old[1]).total_seconds()) if old else None,
        })
    return {"aging_s": q.settings.priority_aging, "sample": WAIT_SAMPLE, "by_priority": rows,
            "by_limited_type": held_by_limits(q, claimed, now)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def starvation_frame(q: "Queue", *, now: datetime | None = None) -> "pd.DataFrame":
    """:func:`starvation` as a DataFrame (one row per priority, highest first)."""
    import pandas as pd

    view = starvation(q, now=now)
    columns = ["priority", "claimed", "wait_p50_s", "wait_p95_s", "wait_max_s", "waiting", "oldest_waiting_id",
               "oldest_waiting_s"]
    return pd.DataFrame(view["by_priority"], columns=columns)


# ---------------------------------------------------------------- time held by limits per type
#: attempts per limited type read to measure the peaks the view shows (a bounded read)
SPAN_SAMPLE = 5_000


def held_by_limits(q: "Queue", claimed: list[Any], now: datetime) -> list[dict[str, Any]]:
    """Per limited type (and one row for the unlimited types together, the baseline): the wait from
    enqueue to first claim over ``claimed`` (rows of priority, created_at, started_at, type), and the
    peak starts per window and peak attempts at once measured from the latest attempts.

    A job of a limited type waits while its limit holds it, plus what any job waits for a worker:
    the unlimited row shows the latter, so the difference is the time held by the limit.
    """
    from qkit.ops.limits import current_limits

    limits = current_limits(q)
    if not limits:
        return []
    waits: dict[str | None, list[float]] = {}
    for _priority, created, started, job_type in claimed:
        key = job_type if job_type in limits else None
        waits.setdefault(key, []).append(max(0.0, (started - created).total_seconds()))
    rows = []
    for job_type in [*sorted(limits), None]:
        w = sorted(waits.get(job_type, []))
        row: dict[str, Any] = {"type": job_type if job_type is not None else "(unlimited types)",
                               "limit": limits[job_type].describe() if job_type is not None else "",
                               "claimed": len(w), "wait_p50_s": _round(_pct(w, 0.5)),
                               "wait_p95_s": _round(_pct(w, 0.95)),
                               "wait_max_s": round(w[-1], 3) if w else None,
                               "wait_total_s": round(sum(w), 3), "peak_starts": None, "peak_running": None}
        if job_type is not None:
            spans = q.ledger.attempt_spans(q.name, job_type, SPAN_SAMPLE)
            lim = limits[job_type]
            if lim.rate is not None:
                row["peak_starts"] = peak_starts([s.timestamp() for s, _ in spans], lim.per)
            row["peak_running"] = peak_overlap([(s.timestamp(), e.timestamp() if e else math.inf)
                                                for s, e in spans])
        rows.append(row)
    return rows


def held_frame(q: "Queue", *, now: datetime | None = None) -> "pd.DataFrame":
    """``q.stats()["starvation"]["by_limited_type"]`` as a DataFrame: time held by limits per type."""
    import pandas as pd

    columns = ["type", "limit", "claimed", "wait_p50_s", "wait_p95_s", "wait_max_s", "wait_total_s",
               "peak_starts", "peak_running"]
    return pd.DataFrame(starvation(q, now=now).get("by_limited_type", []), columns=columns)

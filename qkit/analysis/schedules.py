"""A queue's recurring schedules as a table for people (``queue_monitor``'s schedule cell).

One row per schedule, soonest next fire first: its job type, cron expression
and time zone, ``catch_up``, the next fire time in UTC and in the schedule's
own zone, how long until then on Redis's clock (negative: due, waiting for the
next burst or ``qkit tick``), and the last fire with its job.  Payloads are
left out: they are job data (docs/semantics.md#schedules).
"""
from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd

COLUMNS = ["schedule", "type", "cron", "tz", "catch_up", "next_fire_at", "next_fire_local", "next_in_s",
           "last_fire_at", "last_job_id"]


def local_time(t: Any, tz: str) -> str:
    """``2026-12-01 02:30 CET``: ``t`` in the zone ``tz``, to the minute (seconds when it has them)."""
    if t is None or pd.isna(t):
        return ""
    local = pd.Timestamp(t).to_pydatetime().astimezone(ZoneInfo(tz))
    return local.strftime("%Y-%m-%d %H:%M:%S %Z" if local.second else "%Y-%m-%d %H:%M %Z")


def schedule_table(q: Any) -> pd.DataFrame:
    """The schedules of queue ``q`` (``q.schedules()``), with the time to each next fire on Redis's clock."""
    rows = q.schedules()
    now = q.redis_time() if rows else None
    out = [{"schedule": s["name"], "type": s["type"], "cron": s["cron"], "tz": s["tz"], "catch_up": s["catch_up"],
            "next_fire_at": s["next_fire_at"], "next_fire_local": local_time(s["next_fire_at"], s["tz"]),
            "next_in_s": (s["next_fire_at"] - now).total_seconds(), "last_fire_at": s["last_fire_at"],
            "last_job_id": s["last_job_id"]} for s in rows]
    df = pd.DataFrame(out, columns=COLUMNS)
    for col in ("next_fire_at", "last_fire_at"):
        df[col] = pd.to_datetime(df[col], utc=True)
    df["last_job_id"] = df["last_job_id"].astype("Int64")
    df["next_in_s"] = df["next_in_s"].astype(float)
    return df

"""pandas DataFrames from the ledger, for notebooks and analysts (SPEC §4, §5).

Every function here sends one SQL query (never one per job) to the ledger's
read engine and shapes the rows with pandas.  Times are ``datetime64[UTC]``;
durations are in the unit their column name says (``_ms``, ``_s``).

``since`` (a datetime, a pandas Timestamp or an ISO 8601 string; naive means
UTC) keeps the jobs enqueued at or after that time, and everything that
belongs to them (attempts, events), so a notebook can look at one batch.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from qkit.extras import require

require("qkit.frames", "pandas")

import pandas as pd  # noqa: E402
from sqlalchemy import and_, func, select  # noqa: E402

from qkit.ledger import job_attempts, job_events, jobs as jobs_t, utcnow, worker_runs  # noqa: E402

if TYPE_CHECKING:
    from qkit.queue import Queue

#: states of the queue-depth reconstruction, in plotting order
DEPTH_STATES = ("pending", "delayed", "processing", "completed", "failed")

#: event -> the state the job is in after it (events not listed change nothing)
_EVENT_STATE = {
    "enqueued": "pending", "claimed": "processing", "completed": "completed", "retry_scheduled": "pending",
    "failed": "failed", "dead": "failed", "replayed": "pending", "released": "pending",
}

#: candidate bin widths for time series, smallest first
_FREQS = ("1s", "2s", "5s", "10s", "15s", "30s", "1min", "2min", "5min", "10min", "15min", "30min",
          "1h", "2h", "6h", "12h", "1D", "7D")


# ---------------------------------------------------------------- helpers
def as_utc(value: Any) -> datetime | None:
    """``None``/``""`` -> None; a datetime, Timestamp or ISO 8601 string -> an aware UTC datetime.

    Raises ValueError for text that is not a date or time.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            ts = pd.Timestamp(value.strip())
        except (ValueError, TypeError):
            raise ValueError(f"{value!r} is not an ISO 8601 date or time (e.g. 2025-01-31T12:00:00Z)") from None
    else:
        ts = pd.Timestamp(value)
    if pd.isna(ts):
        raise ValueError(f"{value!r} is not a date or time")
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.to_pydatetime()


def _frame(q: "Queue", query: Any, times: Iterable[str] = ()) -> pd.DataFrame:
    """Run one query on the read engine; times become datetime64[UTC] (also when empty)."""
    with q.ledger.read_engine.connect() as conn:
        result = conn.execute(query)
        columns = list(result.keys())
        df = pd.DataFrame(result.all(), columns=columns)
    for col in times:
        df[col] = pd.to_datetime(df[col], utc=True)
    return df


def _since(query: Any, since: Any) -> Any:
    start = as_utc(since)
    return query if start is None else query.where(jobs_t.c.created_at >= start)


def auto_freq(start: Any, end: Any, bins: int = 60) -> str:
    """The smallest bin width from a fixed list that cuts ``start..end`` into at most ``bins`` bins."""
    if start is None or end is None or pd.isna(start) or pd.isna(end):
        return _FREQS[0]
    span = pd.Timestamp(end) - pd.Timestamp(start)
    for freq in _FREQS:
        if span / pd.Timedelta(freq) <= bins:
            return freq
    return _FREQS[-1]


# ---------------------------------------------------------------- one row per thing
def jobs(q: "Queue", *, since: Any = None, status: str | None = None, type: str | None = None,
         ids: Sequence[int] | None = None, payload: bool = False) -> pd.DataFrame:
    """One row per job of the queue, oldest first.

    Adds ``wait_s`` (enqueue to first claim; NaN until claimed) and
    ``run_s`` (first claim to final state).  ``payload=True`` adds the
    payload and result objects.
    """
    cols = [jobs_t.c.id, jobs_t.c.queue, jobs_t.c.type, jobs_t.c.status, jobs_t.c.priority, jobs_t.c.attempts,
            jobs_t.c.max_attempts, jobs_t.c.epoch, jobs_t.c.error, jobs_t.c.idempotency_key, jobs_t.c.run_at,
            jobs_t.c.created_at, jobs_t.c.updated_at, jobs_t.c.started_at, jobs_t.c.finished_at]
    if payload:
        cols += [jobs_t.c.payload, jobs_t.c.result]
    query = _since(select(*cols).where(jobs_t.c.queue == q.name), since)
    if status:
        query = query.where(jobs_t.c.status == status)
    if type:
        query = query.where(jobs_t.c.type == type)
    if ids is not None:
        query = query.where(jobs_t.c.id.in_([int(i) for i in ids]))
    df = _frame(q, query.order_by(jobs_t.c.id),
                ("run_at", "created_at", "updated_at", "started_at", "finished_at"))
    df["wait_s"] = (df["started_at"] - df["created_at"]).dt.total_seconds()
    df["run_s"] = (df["finished_at"] - df["started_at"]).dt.total_seconds()
    return df


def attempts(q: "Queue", *, since: Any = None, job_id: int | None = None,
             traceback: bool = False) -> pd.DataFrame:
    """One row per attempt, with its job's type, priority, status, epoch and max_attempts.

    ``outcome`` is ``completed``, ``failed``, ``timeout``, ``lost``, or
    None while the attempt runs.  ``traceback=True`` adds the traceback text.
    """
    cols = [job_attempts.c.id, job_attempts.c.job_id, jobs_t.c.type, jobs_t.c.priority, job_attempts.c.epoch,
            job_attempts.c.attempt, job_attempts.c.worker, job_attempts.c.started_at, job_attempts.c.finished_at,
            job_attempts.c.duration_ms, job_attempts.c.outcome, job_attempts.c.error, job_attempts.c.fingerprint,
            jobs_t.c.status.label("job_status"), jobs_t.c.epoch.label("job_epoch"), jobs_t.c.max_attempts]
    if traceback:
        cols.append(job_attempts.c.traceback)
    query = select(*cols).select_from(job_attempts.join(jobs_t, jobs_t.c.id == job_attempts.c.job_id)) \
        .where(jobs_t.c.queue == q.name)
    query = _since(query, since)
    if job_id is not None:
        query = query.where(job_attempts.c.job_id == int(job_id))
    return _frame(q, query.order_by(job_attempts.c.job_id, job_attempts.c.epoch, job_attempts.c.attempt),
                  ("started_at", "finished_at"))


def events(q: "Queue", *, since: Any = None, job_id: int | None = None) -> pd.DataFrame:
    """One row per job event (``enqueued``, ``claimed``, ``retry_scheduled``...), in order."""
    query = select(job_events.c.id, job_events.c.job_id, jobs_t.c.type, job_events.c.at, job_events.c.event,
                   job_events.c.worker, job_events.c.detail) \
        .select_from(job_events.join(jobs_t, jobs_t.c.id == job_events.c.job_id)).where(jobs_t.c.queue == q.name)
    query = _since(query, since)
    if job_id is not None:
        query = query.where(job_events.c.job_id == int(job_id))
    return _frame(q, query.order_by(job_events.c.id), ("at",))


def runs(q: "Queue", *, since: Any = None) -> pd.DataFrame:
    """One row per worker run (burst) of the queue, oldest first.

    Adds ``duration_s`` and, from the record a scheduled run keeps in its row
    (``params.runner``, written by :mod:`qkit.scheduled`): ``run_status`` (ok,
    failed, kernel_died, timeout, interrupted, error; ``running`` while it
    runs), ``exit_code``, ``output`` (the executed notebook) and
    ``run_duration_s``; empty for other bursts.  ``run_id`` is the scheduled
    run's id.
    """
    query = select(worker_runs).where(worker_runs.c.queue == q.name)
    start = as_utc(since)
    if start is not None:
        query = query.where(worker_runs.c.started_at >= start)
    df = _frame(q, query.order_by(worker_runs.c.id), ("started_at", "finished_at"))
    df["duration_s"] = (df["finished_at"] - df["started_at"]).dt.total_seconds()
    df["run_id"] = df["run_id"].astype(object)
    runner = [p["runner"] if isinstance(p, dict) and isinstance(p.get("runner"), dict) else {} for p in df["params"]]
    df["run_status"] = pd.Series([r.get("status") for r in runner], index=df.index, dtype=object)
    df["exit_code"] = pd.Series([r.get("exit_code") for r in runner], index=df.index, dtype="Int64")
    df["output"] = pd.Series([r.get("output") for r in runner], index=df.index, dtype=object)
    df["run_duration_s"] = pd.Series([r.get("duration_s") for r in runner], index=df.index, dtype="float64")
    return df


# ---------------------------------------------------------------- analyses
def retry_distribution(q: "Queue", *, since: Any = None) -> pd.DataFrame:
    """How many attempts finished jobs needed, by type: to success, or to the DLQ.

    Columns: ``type``, ``outcome`` (``completed`` | ``dlq``), ``attempts``,
    ``jobs``, ``share`` (of the type's finished jobs).  Attempts count in the
    job's current replay epoch.
    """
    query = select(jobs_t.c.type, jobs_t.c.status, jobs_t.c.attempts, func.count().label("jobs")) \
        .where(jobs_t.c.queue == q.name, jobs_t.c.status.in_(("completed", "failed")))
    query = _since(query, since).group_by(jobs_t.c.type, jobs_t.c.status, jobs_t.c.attempts)
    df = _frame(q, query)
    df["outcome"] = df.pop("status").map({"completed": "completed", "failed": "dlq"})
    df["jobs"] = df["jobs"].astype("int64")
    df["attempts"] = df["attempts"].astype("int64")
    totals = df.groupby("type")["jobs"].transform("sum")
    df["share"] = (df["jobs"] / totals).astype("float64")
    return df[["type", "outcome", "attempts", "jobs", "share"]].sort_values(
        ["type", "outcome", "attempts"]).reset_index(drop=True)


def attempt_outcomes(q: "Queue", *, since: Any = None) -> pd.DataFrame:
    """Outcomes by attempt number and type: does a retry help?

    Columns: ``type``, ``attempt``, ``attempts`` (how many were made),
    ``completed``, ``failed``, ``timeout``, ``lost``, ``success_rate``
    (completed / finished attempts with that number).
    """
    query = select(jobs_t.c.type, job_attempts.c.attempt, job_attempts.c.outcome, func.count().label("n")) \
        .select_from(job_attempts.join(jobs_t, jobs_t.c.id == job_attempts.c.job_id)) \
        .where(jobs_t.c.queue == q.name, job_attempts.c.outcome.is_not(None))
    df = _frame(q, _since(query, since).group_by(jobs_t.c.type, job_attempts.c.attempt, job_attempts.c.outcome))
    outcomes = ["completed", "failed", "timeout", "lost"]
    if df.empty:
        return pd.DataFrame(columns=["type", "attempt", "attempts", *outcomes, "success_rate"])
    wide = df.pivot_table(index=["type", "attempt"], columns="outcome", values="n", aggfunc="sum", fill_value=0)
    wide = wide.reindex(columns=outcomes, fill_value=0).astype("int64")
    wide.columns.name = None
    wide.insert(0, "attempts", wide.sum(axis=1))
    wide["success_rate"] = wide["completed"] / wide["attempts"]
    return wide.reset_index()


def type_summary(q: "Queue", *, since: Any = None) -> pd.DataFrame:
    """Per type: jobs, outcomes, success rate, attempts, and execution-time percentiles.

    ``success_rate`` = completed / (completed + failed) jobs.  ``exec_*_ms``
    are over completed attempts (how long a successful handler call takes);
    ``fail_exec_p50_ms`` over failed and timed-out ones.
    """
    query = select(jobs_t.c.id, jobs_t.c.type, jobs_t.c.status, job_attempts.c.outcome,
                   job_attempts.c.duration_ms) \
        .select_from(jobs_t.outerjoin(job_attempts, job_attempts.c.job_id == jobs_t.c.id)) \
        .where(jobs_t.c.queue == q.name)
    df = _frame(q, _since(query, since))
    columns = ["type", "jobs", "completed", "failed", "active", "success_rate", "attempts", "attempts_per_job",
               "exec_p50_ms", "exec_p90_ms", "exec_p99_ms", "exec_mean_ms", "fail_exec_p50_ms"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    per_job = df.drop_duplicates("id")
    counts = pd.crosstab(per_job["type"], per_job["status"]).reindex(
        columns=["pending", "processing", "completed", "failed"], fill_value=0)
    out = pd.DataFrame(index=counts.index)
    out["jobs"] = counts.sum(axis=1)
    out["completed"] = counts["completed"]
    out["failed"] = counts["failed"]
    out["active"] = counts["pending"] + counts["processing"]
    finished = out["completed"] + out["failed"]
    out["success_rate"] = (out["completed"] / finished.where(finished > 0)).astype("float64")
    out["attempts"] = df[df["outcome"].notna()].groupby("type").size().reindex(out.index, fill_value=0)
    out["attempts_per_job"] = out["attempts"] / out["jobs"]
    done = df[df["outcome"] == "completed"].groupby("type")["duration_ms"]
    for p in (50, 90, 99):
        out[f"exec_p{p}_ms"] = done.quantile(p / 100).reindex(out.index)
    out["exec_mean_ms"] = done.mean().reindex(out.index)
    bad = df[df["outcome"].isin(["failed", "timeout"])].groupby("type")["duration_ms"]
    out["fail_exec_p50_ms"] = bad.median().reindex(out.index)
    out.index.name = "type"
    return out.reset_index()[columns]


def wait_times(q: "Queue", *, since: Any = None, now: datetime | None = None) -> pd.DataFrame:
    """Wait from enqueue to first claim, by priority (highest first): where starvation shows.

    Columns: ``priority``, ``jobs``, ``claimed``, ``waiting`` (due now,
    never claimed), ``wait_p50_s``, ``wait_p90_s``, ``wait_p99_s``,
    ``wait_max_s`` (over claimed jobs) and ``oldest_waiting_s`` (age of the
    oldest job of that priority that is due and was never claimed).
    """
    now = now or utcnow()
    query = select(jobs_t.c.id, jobs_t.c.priority, jobs_t.c.status, jobs_t.c.created_at, jobs_t.c.started_at,
                   jobs_t.c.run_at).where(jobs_t.c.queue == q.name)
    df = _frame(q, _since(query, since), ("created_at", "started_at", "run_at"))
    columns = ["priority", "jobs", "claimed", "waiting", "wait_p50_s", "wait_p90_s", "wait_p99_s", "wait_max_s",
               "oldest_waiting_s"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    df["wait_s"] = (df["started_at"] - df["created_at"]).dt.total_seconds()
    stamp = pd.Timestamp(now)
    never = df["started_at"].isna() & (df["status"] == "pending") & (df["run_at"] <= stamp)
    df["age_s"] = (stamp - df["created_at"]).dt.total_seconds().where(never)
    g = df.groupby("priority")
    out = pd.DataFrame({"jobs": g.size(), "claimed": g["wait_s"].count(),
                        "waiting": never.groupby(df["priority"]).sum()})
    for p in (50, 90, 99):
        out[f"wait_p{p}_s"] = g["wait_s"].quantile(p / 100)
    out["wait_max_s"] = g["wait_s"].max()
    out["oldest_waiting_s"] = g["age_s"].max()
    out = out.sort_index(ascending=False)
    out.index.name = "priority"
    return out.reset_index()[columns]


def waiting(q: "Queue", *, limit: int = 10, now: datetime | None = None) -> pd.DataFrame:
    """The oldest jobs that are due and waiting for a worker, oldest first, with their age."""
    now = now or utcnow()
    query = select(jobs_t.c.id, jobs_t.c.type, jobs_t.c.priority, jobs_t.c.attempts, jobs_t.c.created_at,
                   jobs_t.c.run_at) \
        .where(jobs_t.c.queue == q.name, jobs_t.c.status == "pending", jobs_t.c.run_at <= now) \
        .order_by(jobs_t.c.created_at, jobs_t.c.id).limit(int(limit))
    df = _frame(q, query, ("created_at", "run_at"))
    df["age_s"] = (pd.Timestamp(now) - df["created_at"]).dt.total_seconds()
    df["overdue_s"] = (pd.Timestamp(now) - df["run_at"]).dt.total_seconds()
    return df


def queue_depth(q: "Queue", *, since: Any = None, freq: str | None = None,
                now: datetime | None = None) -> pd.DataFrame:
    """Jobs per state over time, rebuilt from the events (SPEC §5 ``job_events``).

    Index ``at`` (UTC); columns ``pending`` (due, waiting), ``delayed``
    (waiting for a retry back-off), ``processing``, ``completed``,
    ``failed``.  A ``retry_scheduled`` event with a delay makes the job
    ``delayed`` until it is due (a point added at event time + delay).
    Without ``freq`` there is one row per change; with it (e.g. ``"5s"``,
    or ``"auto"``) the last value of each bin, carried forward.
    """
    now = now or utcnow()
    query = select(job_events.c.id, job_events.c.job_id, job_events.c.at, job_events.c.event,
                   job_events.c.detail) \
        .select_from(job_events.join(jobs_t, jobs_t.c.id == job_events.c.job_id)).where(jobs_t.c.queue == q.name)
    ev = _frame(q, _since(query, since).order_by(job_events.c.id), ("at",))
    return depth_from_events(ev, freq=freq, now=now)


def depth_from_events(ev: pd.DataFrame, *, freq: str | None = None, now: datetime | None = None) -> pd.DataFrame:
    """The state-count series of :func:`queue_depth` from an events frame (``job_id, at, event, detail``)."""
    states = list(DEPTH_STATES)
    ev = ev[ev["event"].isin(list(_EVENT_STATE))].copy()
    if ev.empty:
        return pd.DataFrame(columns=states, index=pd.DatetimeIndex([], tz="UTC", name="at"), dtype="int64")
    ev["state"] = ev["event"].map(_EVENT_STATE)
    ev["order"] = range(len(ev))
    ev["delay"] = pd.to_numeric(ev["detail"].map(lambda d: d.get("delay_s") if isinstance(d, dict) else None),
                                errors="coerce").fillna(0.0)
    ev["retry"] = (ev["event"] == "retry_scheduled") & (ev["delay"] > 0)
    ev.loc[ev["retry"], "state"] = "delayed"
    ev = ev.sort_values(["job_id", "order"]).reset_index(drop=True)
    ev["next_at"] = ev.groupby("job_id")["at"].shift(-1)
    ev["due_at"] = ev["at"] + pd.to_timedelta(ev["delay"], unit="s")
    limit = pd.Timestamp(now or utcnow())
    # the job became due (pending) at due_at, if nothing else happened to it first
    becomes_due = ev["retry"] & (ev["due_at"] <= limit) & (ev["next_at"].isna() | (ev["due_at"] < ev["next_at"]))
    synthetic = pd.DataFrame({"job_id": ev.loc[becomes_due, "job_id"], "at": ev.loc[becomes_due, "due_at"],
                              "state": "pending", "order": ev.loc[becomes_due, "order"] + 0.5})
    rows = pd.concat([ev[["job_id", "at", "state", "order"]], synthetic], ignore_index=True)
    rows = rows.sort_values(["job_id", "order"])
    rows["prev"] = rows.groupby("job_id")["state"].shift(1)
    rows = rows[rows["state"] != rows["prev"]]
    plus = pd.get_dummies(rows["state"]).reindex(columns=states, fill_value=0).astype("int64")
    minus = pd.get_dummies(rows["prev"]).reindex(columns=states, fill_value=0).astype("int64")
    delta = plus - minus
    delta.index = pd.DatetimeIndex(rows["at"], name="at")
    delta["order"] = rows["order"].to_numpy()
    depth = delta.reset_index().sort_values(["at", "order"]).set_index("at")[states].cumsum()
    depth = depth.groupby(level=0).last()
    if freq:
        if freq == "auto":
            freq = auto_freq(depth.index.min(), depth.index.max())
        depth = depth.resample(freq).last().ffill().astype("int64")
    return depth


def throughput(q: "Queue", *, since: Any = None, freq: str | None = "auto") -> pd.DataFrame:
    """Finished attempts per time bin, by outcome (columns ``completed``, ``failed``, ``timeout``, ``lost``).

    ``freq="auto"`` picks a bin width giving at most 60 bins; it is kept in
    ``df.attrs["freq"]``.
    """
    query = select(job_attempts.c.finished_at, job_attempts.c.outcome) \
        .select_from(job_attempts.join(jobs_t, jobs_t.c.id == job_attempts.c.job_id)) \
        .where(jobs_t.c.queue == q.name, job_attempts.c.finished_at.is_not(None))
    df = _frame(q, _since(query, since), ("finished_at",))
    outcomes = ["completed", "failed", "timeout", "lost"]
    if df.empty:
        out = pd.DataFrame(columns=outcomes, index=pd.DatetimeIndex([], tz="UTC", name="at"), dtype="int64")
        out.attrs["freq"] = freq if freq and freq != "auto" else _FREQS[0]
        return out
    if not freq or freq == "auto":
        freq = auto_freq(df["finished_at"].min(), df["finished_at"].max())
    out = df.groupby([pd.Grouper(key="finished_at", freq=freq), "outcome"]).size().unstack(fill_value=0)
    out = out.reindex(columns=outcomes, fill_value=0).astype("int64")
    out = out.asfreq(freq, fill_value=0)
    out.index.name = "at"
    out.columns.name = None
    out.attrs["freq"] = freq
    return out


def dlq_groups(q: "Queue") -> pd.DataFrame:
    """The DLQ grouped by error fingerprint and type, largest group first (one query).

    The grouping of ``qkit dlq list --group`` (:func:`qkit.triage.dlq_groups`):
    columns ``fingerprint_id`` (what ``qkit dlq replay --fingerprint`` takes),
    ``fingerprint``, ``type``, ``jobs``, ``first_seen``, ``last_seen``,
    ``sample_id``, ``sample_error``, ``sample_payload``, ``job_ids`` (a list).
    """
    from qkit.triage import dlq_groups as groups

    return groups(q)


def next_due(q: "Queue") -> datetime | None:
    """When the earliest pending job is (or was) due, or None if nothing is pending."""
    with q.ledger.read_engine.connect() as conn:
        value = conn.execute(select(func.min(jobs_t.c.run_at)).where(
            and_(jobs_t.c.queue == q.name, jobs_t.c.status == "pending"))).scalar()
    if value is None:
        return None
    if isinstance(value, str):  # func.min() loses the column type on SQLite
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

"""pandas DataFrames from the ledger, for notebooks and analysts (docs/architecture.md#analysis-needs-the-notebooks-extra).

Every function here sends one SQL query (never one per job) to the ledger's
read engine and shapes the rows with pandas.  Times are ``datetime64[UTC]``;
durations are in the unit their column name says (``_ms``, ``_s``).

``since`` (a datetime, a pandas Timestamp or an ISO 8601 string; naive means
UTC) keeps the jobs enqueued at or after that time, and everything that
belongs to them (attempts, events), so a notebook can look at one batch.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from qkit.extras import require

require("qkit.analysis.frames", "pandas")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from qkit.ledger import analysis as aq  # noqa: E402
from qkit.ledger import utcnow  # noqa: E402
from qkit.ledger.analysis import Scope  # noqa: E402
from qkit.ledger.analysis_outcomes import retry_after_stats  # noqa: E402
#: the DLQ grouped by error fingerprint and type, defined once in qkit.ops.triage (``qkit dlq list --group``)
from qkit.ops.triage import dlq_groups  # noqa: E402, F401
from qkit.utc import as_utc  # noqa: E402 - frames.as_utc for the notebooks

if TYPE_CHECKING:
    from qkit.engine.queue import Queue

#: states of the queue-depth reconstruction, in plotting order
DEPTH_STATES = ("pending", "delayed", "processing", "completed", "failed", "cancelled")

#: event -> the state the job is in after it (events not listed change nothing)
_EVENT_STATE = {
    "enqueued": "pending", "claimed": "processing", "completed": "completed", "retry_scheduled": "pending",
    "failed": "failed", "dead": "failed", "replayed": "pending", "released": "pending", "cancelled": "cancelled",
}

#: candidate bin widths for time series, smallest first
_FREQS = ("1s", "2s", "5s", "10s", "15s", "30s", "1min", "2min", "5min", "10min", "15min", "30min",
          "1h", "2h", "6h", "12h", "1D", "7D")


# ---------------------------------------------------------------- helpers
def _frame(q: "Queue", rows: Any, times: Iterable[str] = (), **kw: Any) -> pd.DataFrame:
    """One of the ledger's row reads as a DataFrame; times become datetime64[UTC] (also when empty)."""
    columns, data = aq.read(q.ledger, rows, q.name, **kw)
    df = pd.DataFrame(data, columns=columns)
    for col in times:
        df[col] = pd.to_datetime(df[col], utc=True)
    return df


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
    df = _frame(q, aq.job_rows, ("run_at", "created_at", "updated_at", "started_at", "finished_at"),
                since=as_utc(since), status=status, type=type, ids=ids, payload=payload)
    df["wait_s"] = (df["started_at"] - df["created_at"]).dt.total_seconds()
    df["run_s"] = (df["finished_at"] - df["started_at"]).dt.total_seconds()
    return df


def attempts(q: "Queue", *, since: Any = None, job_id: int | None = None,
             traceback: bool = False) -> pd.DataFrame:
    """One row per attempt, with its job's type, priority, status, epoch and max_attempts.

    ``outcome`` is ``completed``, ``failed``, ``timeout``, ``lost``, or
    None while the attempt runs.  ``traceback=True`` adds the traceback text.
    """
    return _frame(q, aq.attempt_rows, ("started_at", "finished_at"), since=as_utc(since), job_id=job_id,
                  traceback=traceback)


def events(q: "Queue", *, since: Any = None, job_id: int | None = None) -> pd.DataFrame:
    """One row per job event (``enqueued``, ``claimed``, ``retry_scheduled``...), in order."""
    return _frame(q, aq.event_rows, ("at",), since=as_utc(since), job_id=job_id)


def runs(q: "Queue", *, since: Any = None) -> pd.DataFrame:
    """One row per worker run (burst) of the queue, oldest first.

    Adds ``duration_s`` and, from the record a scheduled run keeps in its row
    (``params.runner``, written by :mod:`qkit.runs.runner`): ``run_status`` (ok,
    failed, kernel_died, timeout, interrupted, error; ``running`` while it
    runs), ``exit_code``, ``output`` (the executed notebook) and
    ``run_duration_s``; empty for other bursts.  ``run_id`` is the scheduled
    run's id.
    """
    df = _frame(q, aq.run_rows, ("started_at", "finished_at"), since=as_utc(since))
    df["duration_s"] = (df["finished_at"] - df["started_at"]).dt.total_seconds()
    df["run_id"] = df["run_id"].astype(object)
    runner = [p["runner"] if isinstance(p, dict) and isinstance(p.get("runner"), dict) else {} for p in df["params"]]
    df["run_status"] = pd.Series([r.get("status") for r in runner], index=df.index, dtype=object)
    df["exit_code"] = pd.Series([r.get("exit_code") for r in runner], index=df.index, dtype="Int64")
    df["output"] = pd.Series([r.get("output") for r in runner], index=df.index, dtype=object)
    df["run_duration_s"] = pd.Series([r.get("duration_s") for r in runner], index=df.index, dtype="float64")
    return df


# ---------------------------------------------------------------- analyses (aggregated in SQL)
def scope(q: "Queue", *, since: Any = None, until: Any = None, type: str | None = None,
          priority: int | None = None, seed: int | None = None) -> Scope:
    """The jobs an analysis covers (:class:`qkit.ledger.analysis.Scope`); "" and None mean no bound."""
    return Scope(q.name, since=as_utc(since), until=as_utc(until), type=type or None,
                 priority=None if priority is None or priority == "" else int(priority),
                 seed=None if seed is None or seed == "" else int(seed))


def _sql(q: "Queue", fn: Any, *args: Any, **kw: Any) -> Any:
    return aq.read(q.ledger, fn, *args, **kw)


def queues(q: "Queue") -> list[str]:
    """The queues that have jobs or worker runs in this ledger, sorted."""
    return _sql(q, aq.queues)


def choices(q: "Queue") -> dict[str, list]:
    """What the queue's jobs can be filtered by: ``{"type": [...], "priority": [...]}`` (sorted)."""
    df = _sql(q, aq.choices, q.name)
    return {"type": sorted(df["type"].unique().tolist()),
            "priority": sorted(int(p) for p in df["priority"].unique())}


def retry_distribution(q: "Queue", **filters: Any) -> pd.DataFrame:
    """How many attempts finished jobs needed, by type: to success, or to the DLQ.

    Columns: ``type``, ``outcome`` (``completed`` | ``dlq``), ``attempts``,
    ``jobs``, ``share`` (of the type's finished jobs).  Attempts count in the
    job's current replay epoch.  ``filters``: see :func:`scope`.
    """
    df = _sql(q, aq.job_outcomes, scope(q, **filters))
    df = df[df["status"].isin(["completed", "failed"])].copy()
    df["outcome"] = df.pop("status").map({"completed": "completed", "failed": "dlq"})
    df["jobs"] = df["jobs"].astype("int64")
    df["attempts"] = df["attempts"].astype("int64")
    totals = df.groupby("type")["jobs"].transform("sum")
    df["share"] = (df["jobs"] / totals).astype("float64")
    return df[["type", "outcome", "attempts", "jobs", "share"]].sort_values(
        ["type", "outcome", "attempts"]).reset_index(drop=True)


_OUTCOMES = ["completed", "failed", "timeout", "lost"]


def attempt_outcomes(q: "Queue", **filters: Any) -> pd.DataFrame:
    """Outcomes by attempt number and type: does a retry help?

    Columns: ``type``, ``attempt``, ``attempts`` (how many were made),
    ``completed``, ``failed``, ``timeout``, ``lost``, ``success_rate``
    (completed / finished attempts with that number).
    """
    return outcomes_from_stats(_sql(q, aq.attempt_stats, scope(q, **filters)))


def outcomes_from_stats(stats: pd.DataFrame) -> pd.DataFrame:
    """:func:`attempt_outcomes` from :func:`qkit.ledger.analysis.attempt_stats` rows."""
    if stats.empty:
        return pd.DataFrame(columns=["type", "attempt", "attempts", *_OUTCOMES, "success_rate"])
    wide = stats.pivot_table(index=["type", "attempt"], columns="outcome", values="n", aggfunc="sum", fill_value=0)
    wide = wide.reindex(columns=_OUTCOMES, fill_value=0).astype("int64")
    wide.columns.name = None
    wide.insert(0, "attempts", wide.sum(axis=1))
    wide["success_rate"] = wide["completed"] / wide["attempts"]
    return wide.reset_index()


#: the groups of :func:`exec_times`: a handler that returned, and one that raised or ran out of time
EXEC_GROUPS = {"completed": ("completed",), "failed or timeout": ("failed", "timeout")}


def exec_times(q: "Queue", **filters: Any) -> pd.DataFrame:
    """Handler execution time per type and group (``completed``, ``failed or timeout``).

    Columns ``type``, ``group``, ``n``, ``mean_ms`` and the percentiles
    ``p5_ms``, ``p25_ms``, ``p50_ms``, ``p75_ms``, ``p95_ms``, ``p99_ms``
    (read from a ~5%-resolution histogram the database builds).
    """
    return exec_from_stats(_sql(q, aq.attempt_stats, scope(q, **filters)))


_PCTS = (5, 25, 50, 75, 90, 95, 99)


def exec_from_stats(stats: pd.DataFrame) -> pd.DataFrame:
    """:func:`exec_times` from :func:`qkit.ledger.analysis.attempt_stats` rows."""
    rows = []
    for (t, group), sub in _grouped(stats):
        qs = aq.hist_quantile(sub["bucket"], sub["n"], [p / 100 for p in _PCTS])
        n = int(sub["n"].sum())
        rows.append({"type": t, "group": group, "n": n, "mean_ms": float(sub["ms_sum"].sum()) / n if n else np.nan,
                     **{f"p{p}_ms": float(v) for p, v in zip(_PCTS, qs)}})
    return pd.DataFrame(rows, columns=["type", "group", "n", "mean_ms", *(f"p{p}_ms" for p in _PCTS)])


def _grouped(stats: pd.DataFrame) -> Iterable[tuple[tuple[str, str], pd.DataFrame]]:
    if stats.empty:
        return []
    ran = stats[stats["bucket"].notna()]
    out = []
    for group, outcomes in EXEC_GROUPS.items():
        sub = ran[ran["outcome"].isin(outcomes)]
        for t, g in sub.groupby("type"):
            g = g.groupby("bucket", as_index=False).agg(n=("n", "sum"), ms_sum=("ms_sum", "sum"))
            out.append(((t, group), g))
    return sorted(out, key=lambda x: x[0])


def retry_after_by_type(q: "Queue", **filters: Any) -> pd.DataFrame:
    """The retry delays handlers asked for (``qkit.Retry(after=)``, a 429/503 ``Retry-After``), by type.

    Columns ``type``, ``source`` (``qkit.Retry`` | ``Retry-After``), ``attempts``, ``jobs``,
    ``min_s``, ``mean_s``, ``max_s`` (asked) and ``over_cap`` (asked more than the queue's
    ``QKIT_BACKOFF_MAX``, which is what they waited).  ``filters``: see :func:`scope`.
    """
    df = _sql(q, retry_after_stats, scope(q, **filters), q.settings.backoff_max)
    for col in ("attempts", "jobs", "over_cap"):
        df[col] = df[col].astype("int64")
    return df


def type_summary(q: "Queue", **filters: Any) -> pd.DataFrame:
    """Per type: jobs, outcomes, success rate, attempts, and execution-time percentiles.

    ``success_rate`` = completed / (completed + failed) jobs.  ``exec_*_ms``
    are over completed attempts (how long a successful handler call takes);
    ``fail_exec_p50_ms`` over failed and timed-out ones.  ``attrs["exec_times"]``
    and ``attrs["attempt_outcomes"]`` hold :func:`exec_times` and
    :func:`attempt_outcomes` of the same scope, from the same query.
    """
    sc = scope(q, **filters)
    jobs_df, stats = aq.read_together(q.ledger, (aq.job_outcomes, sc), (aq.attempt_stats, sc))
    columns = ["type", "jobs", "completed", "failed", "active", "success_rate", "attempts", "attempts_per_job",
               "exec_p50_ms", "exec_p90_ms", "exec_p99_ms", "exec_mean_ms", "fail_exec_p50_ms"]
    if jobs_df.empty:
        out = pd.DataFrame(columns=columns)
        out.attrs["exec_times"] = exec_from_stats(stats)
        out.attrs["attempt_outcomes"] = outcomes_from_stats(stats)
        return out
    counts = jobs_df.pivot_table(index="type", columns="status", values="jobs", aggfunc="sum", fill_value=0) \
        .reindex(columns=["pending", "processing", "completed", "failed"], fill_value=0)
    out = pd.DataFrame(index=counts.index)
    out["jobs"] = jobs_df.groupby("type")["jobs"].sum().astype("int64")
    out["completed"] = counts["completed"].astype("int64")
    out["failed"] = counts["failed"].astype("int64")
    out["active"] = (counts["pending"] + counts["processing"]).astype("int64")
    finished = out["completed"] + out["failed"]
    out["success_rate"] = (out["completed"] / finished.where(finished > 0)).astype("float64")
    made = stats.groupby("type")["n"].sum() if len(stats) else pd.Series(dtype="int64")
    out["attempts"] = made.reindex(out.index, fill_value=0).astype("int64")
    out["attempts_per_job"] = out["attempts"] / out["jobs"]
    ex = exec_from_stats(stats)
    ok = ex[ex["group"] == "completed"].set_index("type")
    bad = ex[ex["group"] != "completed"].set_index("type")
    for p in (50, 90, 99):
        out[f"exec_p{p}_ms"] = ok[f"p{p}_ms"].reindex(out.index)
    out["exec_mean_ms"] = ok["mean_ms"].reindex(out.index)
    out["fail_exec_p50_ms"] = bad["p50_ms"].reindex(out.index)
    out.index.name = "type"
    out = out.reset_index()[columns]
    out.attrs["exec_times"] = ex  # from the same query: the box plots need no second one
    out.attrs["attempt_outcomes"] = outcomes_from_stats(stats)
    return out


def wait_times(q: "Queue", *, now: datetime | None = None, **filters: Any) -> pd.DataFrame:
    """Wait from enqueue to first claim, by priority (highest first): where starvation shows.

    Columns: ``priority``, ``jobs``, ``claimed``, ``waiting`` (due now,
    never claimed), ``wait_p50_s``, ``wait_p90_s``, ``wait_p99_s``,
    ``wait_max_s`` (over claimed jobs) and ``oldest_waiting_s`` (age of the
    oldest job of that priority that is due and was never claimed).
    """
    now = now or utcnow()
    df = _sql(q, aq.wait_stats, scope(q, **filters), now)
    columns = ["priority", "jobs", "claimed", "waiting", "wait_p50_s", "wait_p90_s", "wait_p99_s", "wait_max_s",
               "oldest_waiting_s"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for prio, g in df.groupby("priority"):
        claimed = g[g["bucket"].notna()]
        qs = aq.hist_quantile(claimed["bucket"], claimed["jobs"], [0.5, 0.9, 0.99])
        oldest = g["oldest_created"].dropna()
        rows.append({"priority": int(prio), "jobs": int(g["jobs"].sum()), "claimed": int(claimed["jobs"].sum()),
                     "waiting": int(g["waiting"].sum()), "wait_p50_s": qs[0], "wait_p90_s": qs[1],
                     "wait_p99_s": qs[2], "wait_max_s": float(claimed["wait_max_s"].max()) if len(claimed) else np.nan,
                     "oldest_waiting_s": now.timestamp() - float(oldest.min()) if len(oldest) else np.nan})
    return pd.DataFrame(rows, columns=columns).sort_values("priority", ascending=False).reset_index(drop=True)


def waiting(q: "Queue", *, limit: int = 10, now: datetime | None = None, **filters: Any) -> pd.DataFrame:
    """The oldest jobs that are due and waiting for a worker, oldest first, with their age."""
    now = now or utcnow()
    df = _sql(q, aq.oldest_waiting, scope(q, **filters), now, limit)
    for col in ("created_at", "run_at"):
        df[col] = pd.to_datetime(df[col], utc=True)
    df["age_s"] = (pd.Timestamp(now) - df["created_at"]).dt.total_seconds()
    df["overdue_s"] = (pd.Timestamp(now) - df["run_at"]).dt.total_seconds()
    return df


#: event (and variant, see qkit.ledger.analysis.depth_changes) -> (state before, state after)
_MOVES = {("enqueued", 0): (None, "pending"), ("claimed", 0): ("pending", "processing"),
          ("completed", 0): ("processing", "completed"), ("retry_scheduled", 0): ("processing", "pending"),
          ("retry_scheduled", 1): ("processing", "delayed"), ("retry_scheduled", 2): ("pending", "pending"),
          ("retry_scheduled", 3): ("pending", "delayed"), ("failed", 0): ("processing", "failed"),
          ("failed", 2): ("pending", "failed"), ("reclaimed", 0): ("processing", "pending"),
          ("replayed", 0): ("failed", "pending"), ("released", 0): ("processing", "pending"),
          # a job cancelled during a retry back-off counts as pending until its back-off would have ended
          ("cancelled", 0): ("processing", "cancelled"), ("cancelled", 1): ("pending", "cancelled"),
          ("due", 0): ("delayed", "pending")}


def _window(q: "Queue", sc: Scope, what: str, start: Any, end: Any, freq: str | None,
            now: datetime) -> tuple[float, float, float, str, bool] | None:
    """(origin, width_s, end, freq, single_queue) of a time series, or None when it has no data."""
    single = queues(q) == [q.name]
    lo, hi = as_utc(start), as_utc(end)
    if lo is None or hi is None:
        first, last = _sql(q, aq.time_bounds, sc, what, single)
        if first is None:
            return None
        lo = lo or datetime.fromtimestamp(float(first), timezone.utc)
        # a millisecond of slack: epoch_s() is that precise on SQLite
        hi = hi or max(datetime.fromtimestamp(float(last) + 1e-3, timezone.utc), lo)
    hi = min(hi, max(now, lo))
    if not freq or freq == "auto":
        freq = auto_freq(lo, hi)
    width = pd.Timedelta(freq).total_seconds()
    origin = math.floor(lo.timestamp() / width) * width
    return origin, width, hi.timestamp(), freq, single


def _no_series(columns: Sequence[str], freq: str | None) -> pd.DataFrame:
    out = pd.DataFrame(columns=list(columns), index=pd.DatetimeIndex([], tz="UTC", name="at"), dtype="int64")
    out.attrs["freq"] = freq if freq and freq != "auto" else _FREQS[0]
    return out


def queue_depth(q: "Queue", *, start: Any = None, end: Any = None, freq: str | None = "auto",
                now: datetime | None = None, **filters: Any) -> pd.DataFrame:
    """Jobs per state over time, rebuilt from the events (``job_events``, docs/semantics.md#statuses), counted in SQL.

    Index ``at`` (UTC, bin start); columns ``pending`` (due, waiting),
    ``delayed`` (waiting for a retry back-off), ``processing``,
    ``completed``, ``failed``, ``cancelled``: the state at the end of each bin.
    ``start``/``end`` bound the chart's time window (the states at ``start``
    include everything before it); ``freq`` is the bin width (``"auto"``:
    at most 60 bins), kept in ``df.attrs["freq"]``.  ``filters`` choose the
    jobs (:func:`scope`).
    """
    now = now or utcnow()
    sc = scope(q, **filters)
    states = list(DEPTH_STATES)
    win = _window(q, sc, "events", start, end, freq, now)
    if win is None:
        return _no_series(states, freq)
    origin, width, stop, freq, single = win
    lo = as_utc(start)
    nbins = int(math.floor((stop - origin) / width)) + 1
    df = _sql(q, aq.depth_changes, sc, origin=origin, width=width, end=stop if as_utc(end) else None,
              start=None if lo is None else lo.timestamp(), single_queue=single, nbins=nbins)
    last_due = math.floor((min(stop, now.timestamp()) - origin) / width)  # back-offs ending later: still delayed
    delta = np.zeros((nbins + 1, len(states)), dtype="int64")  # row 0: before the window

    def move(key: tuple[str, int], b: Any, n: int) -> None:
        before, after = _MOVES.get(key, (None, None))
        if after is None:
            return
        row = min(max(int(b) + 1, 0), nbins)
        if before:
            delta[row, states.index(before)] -= n
        delta[row, states.index(after)] += n

    for ev, var, b, due, n in zip(df["event"], df["variant"], df["bin"], df["due_bin"], df["n"]):
        move((ev, int(var)), b, int(n))
        if int(var) % 2 and due is not None and due == due and due <= last_due:  # back-off over: pending
            move(("due", 0), due, int(n))
    depth = np.cumsum(delta, axis=0)[1:]
    index = pd.DatetimeIndex(pd.to_datetime(origin + width * np.arange(nbins), unit="s", utc=True), name="at")
    out = pd.DataFrame(np.maximum(depth, 0), columns=states, index=index)
    out.attrs["freq"] = freq
    return out


def throughput(q: "Queue", *, start: Any = None, end: Any = None, freq: str | None = "auto",
               now: datetime | None = None, **filters: Any) -> pd.DataFrame:
    """Finished attempts per time bin, by outcome (columns ``completed``, ``failed``, ``timeout``, ``lost``).

    ``freq="auto"`` picks a bin width giving at most 60 bins; it is kept in
    ``df.attrs["freq"]``.  ``start``/``end`` bound the time window.
    """
    now = now or utcnow()
    sc = scope(q, **filters)
    win = _window(q, sc, "attempts", start, end, freq, now)
    if win is None:
        return _no_series(_OUTCOMES, freq)
    origin, width, stop, freq, single = win
    lo = as_utc(start)
    df = _sql(q, aq.finished_attempts, sc, origin=origin, width=width, start=None if lo is None else lo.timestamp(),
              end=stop, single_queue=single)
    nbins = int(math.floor((stop - origin) / width)) + 1
    wide = df.pivot_table(index="bin", columns="outcome", values="n", aggfunc="sum", fill_value=0) if len(df) \
        else pd.DataFrame()
    wide = wide.reindex(index=range(nbins), columns=_OUTCOMES, fill_value=0).fillna(0).astype("int64")
    wide.index = pd.DatetimeIndex(pd.to_datetime(origin + width * np.arange(nbins), unit="s", utc=True), name="at")
    wide.columns.name = None
    wide.attrs["freq"] = freq
    return wide


def next_due(q: "Queue") -> datetime | None:
    """When the earliest pending job is (or was) due, or None if nothing is pending."""
    value = aq.read(q.ledger, aq.first_due, q.name)
    if value is None:
        return None
    return as_utc(value)  # text on SQLite: func.min() loses the column type

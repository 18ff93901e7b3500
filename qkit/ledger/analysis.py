"""The analysis SQL: every aggregate :mod:`qkit.analysis.frames` shapes, as SQLAlchemy Core, on SQLite and PostgreSQL.

The database does the counting: each query groups and returns a few hundred
rows at most, however many jobs the ledger holds (a million jobs and three
million attempts take seconds, see ``bench/analyst_scale.py``).  Durations
are summarised as log-bucket histograms (:data:`BUCKETS_PER_E` buckets per
factor e, about 5% wide), from which percentiles are read back with
:func:`hist_quantile`.

A :class:`Scope` says which jobs a query covers: one queue, and optionally a
creation-time window, a type, a priority and a seeded batch (the ``seed`` in
the payload of ``qkit.analysis.notebook_helpers.seeded_batch`` jobs).  Nothing here runs SQL
per job, and nothing outside this module writes analysis SQL.  It lives in the ledger package, which
owns all SQL, but is imported only by the analysis modules (it needs pandas: the ``notebooks`` extra).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import Float, Integer, and_, case, cast, func, literal, literal_column, select, union_all
from sqlalchemy.engine import Connection

from qkit.ledger.engine import LedgerBase
from qkit.ledger.schema import job_attempts, job_events, jobs, worker_runs
from qkit.utc import as_utc

#: histogram resolution: bucket b holds values in [e^(b/K), e^((b+1)/K)) for K buckets per factor e
BUCKETS_PER_E = 20
#: the bucket of zero and of values under a microsecond-ish floor
ZERO_BUCKET = -100_000
_FLOOR = 1e-3


@dataclass(frozen=True)
class Scope:
    """The jobs an analysis covers: a queue, and optionally a window, type, priority, or seeded batch."""

    queue: str
    since: datetime | None = None  # enqueued at or after
    until: datetime | None = None  # enqueued before
    type: str | None = None
    priority: int | None = None
    seed: int | None = None

    @property
    def whole_queue(self) -> bool:
        """True when every job of the queue is in scope."""
        return self.since is None and self.until is None and self.type is None and self.priority is None \
            and self.seed is None

    def where(self) -> list[Any]:
        """The conditions on ``jobs`` that select the scope."""
        cond = [jobs.c.queue == self.queue]
        if self.since is not None:
            cond.append(jobs.c.created_at >= self.since)
        if self.until is not None:
            cond.append(jobs.c.created_at < self.until)
        if self.type is not None:
            cond.append(jobs.c.type == self.type)
        if self.priority is not None:
            cond.append(jobs.c.priority == int(self.priority))
        if self.seed is not None:
            cond.append(jobs.c.payload["seed"].as_integer() == int(self.seed))
        return cond

    def but(self, **changes: Any) -> "Scope":
        return replace(self, **changes)


# ---------------------------------------------------------------- dialect helpers
def _dialect(conn: Connection) -> str:
    return conn.dialect.name


def epoch_s(col: Any, dialect: str) -> Any:
    """Seconds since 1970 of a UTC time column (SQLite stores naive UTC text).

    On SQLite it goes through julianday(), a double precise to ~50 µs at
    today's dates: rounded to the millisecond, so 12:00:01 is not 12:00:00.99995.
    """
    if dialect == "sqlite":
        return func.round((func.julianday(col) - 2440587.5) * 86400.0, 3)
    return cast(func.extract("epoch", col), Float)


def seconds_between(start: Any, end: Any, dialect: str) -> Any:
    """end - start in seconds (NULL if either is NULL), one conversion per column."""
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return cast(func.extract("epoch", end - start), Float)


def bucket(expr: Any) -> Any:
    """The log bucket of a non-negative number (:data:`ZERO_BUCKET` for ~0; NULL stays NULL)."""
    return case((expr > _FLOOR, cast(func.floor(func.ln(expr) * BUCKETS_PER_E), Integer)),
                (expr.is_not(None), literal(ZERO_BUCKET)), else_=None)


def bucket_value(b: Any) -> Any:
    """A representative value (the geometric middle) of bucket(s) ``b``."""
    b = np.asarray(b, dtype=float)
    return np.where(b == ZERO_BUCKET, 0.0, np.exp((b + 0.5) / BUCKETS_PER_E))


def hist_quantile(buckets: Sequence[float], counts: Sequence[float], q: float | Sequence[float]) -> Any:
    """The q-quantile(s) of a bucket histogram (nearest rank); NaN when empty."""
    order = np.argsort(np.asarray(buckets, dtype=float))
    b = np.asarray(buckets, dtype=float)[order]
    c = np.asarray(counts, dtype=float)[order]
    total = c.sum()
    qs = np.atleast_1d(np.asarray(q, dtype=float))
    if total <= 0:
        out = np.full(len(qs), np.nan)
    else:
        cum = np.cumsum(c)
        idx = np.searchsorted(cum, np.maximum(1.0, np.ceil(qs * total)), side="left")
        out = bucket_value(b[np.minimum(idx, len(b) - 1)])
    return out if np.ndim(q) else float(out[0])


def _ensure_math(conn: Connection) -> None:
    """SQLite: two sorter threads, and ``ln``/``floor`` from Python where the build lacks math functions."""
    if _dialect(conn) != "sqlite":
        return
    raw = conn.connection.driver_connection
    if getattr(raw, "_qkit_math", False):
        return
    # GROUP BY sorts every row on SQLite: let its sorter use a second thread (millions of events)
    raw.execute("PRAGMA threads=2")
    try:
        raw.execute("SELECT ln(2.0), floor(2.5)").fetchone()
    except Exception:  # noqa: BLE001 - sqlite3.OperationalError: no such function
        raw.create_function("ln", 1, lambda x: math.log(x) if x and x > 0 else None, deterministic=True)
        raw.create_function("floor", 1, lambda x: None if x is None else math.floor(x), deterministic=True)
    try:
        raw._qkit_math = True
    except AttributeError:
        pass


def run(conn: Connection, query: Any) -> pd.DataFrame:
    """Execute one query; its rows as a DataFrame (columns named as the query labels them)."""
    _ensure_math(conn)
    result = conn.execute(query)
    return pd.DataFrame(result.all(), columns=list(result.keys()))


# ---------------------------------------------------------------- what exists
def queues(conn: Connection) -> list[str]:
    """Every queue that has jobs or worker runs in the ledger, sorted."""
    query = union_all(select(jobs.c.queue).distinct(), select(worker_runs.c.queue).distinct())
    return sorted({r[0] for r in conn.execute(query)})


def choices(conn: Connection, queue: str) -> pd.DataFrame:
    """The (type, priority) pairs of a queue's jobs, with their job counts."""
    return run(conn, select(jobs.c.type, jobs.c.priority, func.count().label("jobs"))
               .where(jobs.c.queue == queue).group_by(jobs.c.type, jobs.c.priority))


# ---------------------------------------------------------------- jobs and attempts
def job_outcomes(conn: Connection, scope: Scope) -> pd.DataFrame:
    """Jobs by ``type``, ``status`` and ``attempts`` (in the current epoch): column ``jobs``."""
    return run(conn, select(jobs.c.type, jobs.c.status, jobs.c.attempts, func.count().label("jobs"))
               .where(*scope.where()).group_by(jobs.c.type, jobs.c.status, jobs.c.attempts))


def attempt_stats(conn: Connection, scope: Scope) -> pd.DataFrame:
    """Finished attempts by ``type``, ``attempt``, ``outcome`` and duration ``bucket``: ``n``, ``ms_sum``."""
    b = bucket(job_attempts.c.duration_ms).label("bucket")
    query = select(jobs.c.type, job_attempts.c.attempt, job_attempts.c.outcome, b, func.count().label("n"),
                   func.sum(job_attempts.c.duration_ms).label("ms_sum")) \
        .select_from(job_attempts.join(jobs, jobs.c.id == job_attempts.c.job_id)) \
        .where(*scope.where(), job_attempts.c.outcome.is_not(None)) \
        .group_by(jobs.c.type, job_attempts.c.attempt, job_attempts.c.outcome, *_by("bucket"))
    return run(conn, query)


def wait_stats(conn: Connection, scope: Scope, now: datetime) -> pd.DataFrame:
    """Jobs by ``priority`` and wait ``bucket`` (enqueue to first claim, s; NULL: never claimed).

    Columns ``jobs``, ``wait_max_s``, ``waiting`` (due now, never claimed)
    and ``oldest_created`` (the earliest enqueue among those waiting).
    """
    d = _dialect(conn)
    wait = seconds_between(jobs.c.created_at, jobs.c.started_at, d)
    waiting = and_(jobs.c.started_at.is_(None), jobs.c.status == "pending", jobs.c.run_at <= now)
    b = bucket(wait).label("bucket")
    query = select(jobs.c.priority, b, func.count().label("jobs"), func.max(wait).label("wait_max_s"),
                   func.sum(case((waiting, 1), else_=0)).label("waiting"),
                   func.min(case((waiting, epoch_s(jobs.c.created_at, d)), else_=None)).label("oldest_created")) \
        .where(*scope.where()).group_by(jobs.c.priority, *_by("bucket"))
    return run(conn, query)


def oldest_waiting(conn: Connection, scope: Scope, now: datetime, limit: int) -> pd.DataFrame:
    """The oldest jobs that are due and waiting for a worker (rows, at most ``limit``)."""
    query = select(jobs.c.id, jobs.c.type, jobs.c.priority, jobs.c.attempts, jobs.c.created_at, jobs.c.run_at) \
        .where(*scope.where(), jobs.c.status == "pending", jobs.c.run_at <= now) \
        .order_by(jobs.c.created_at, jobs.c.id).limit(int(limit))
    return run(conn, query)


# ---------------------------------------------------------------- time series
def _in_scope(scope: Scope, single_queue: bool, job_id: Any) -> tuple[Any, list[Any]]:
    """(FROM clause, conditions) selecting rows of ``job_id``'s table that belong to the scope.

    When the scope is a whole queue and it is the ledger's only queue, no
    join is needed: every row belongs to it.
    """
    if scope.whole_queue and single_queue:
        return None, []
    return jobs, [jobs.c.id == job_id, *scope.where()]


def _seconds(value: Any) -> float | None:
    """A time as the ledger returns it (datetime, or text from SQLite's min/max) -> epoch seconds."""
    if value is None:
        return None
    return as_utc(value).timestamp()


def time_bounds(conn: Connection, scope: Scope, what: str, single_queue: bool = False) -> tuple[Any, Any]:
    """(first, last) time, as epoch seconds, of the scope's events (``what="events"``) or finished attempts.

    min/max of the raw column: ISO text sorts as time on SQLite, and no per-row conversion is needed.
    """
    table, col = (job_events, job_events.c.at) if what == "events" else (job_attempts, job_attempts.c.finished_at)
    extra, cond = _in_scope(scope, single_queue, table.c.job_id)
    query = select(func.min(col), func.max(col)).select_from(table)
    if extra is not None:
        query = query.join(extra, cond[0]).where(*cond[1:])
    row = conn.execute(query.where(col.is_not(None))).one()
    return _seconds(row[0]), _seconds(row[1])


def created_bounds(conn: Connection, scope: Scope) -> tuple[Any, Any]:
    """(first, last) enqueue time of the scope's jobs, as epoch seconds."""
    row = conn.execute(select(func.min(jobs.c.created_at), func.max(jobs.c.created_at)).where(*scope.where())).one()
    return _seconds(row[0]), _seconds(row[1])


#: the events that move a job between the states of the depth chart
DEPTH_EVENTS = ("enqueued", "claimed", "completed", "retry_scheduled", "failed", "reclaimed", "replayed", "released",
                "cancelled")


def _counted(rows: Any, *keys: str) -> Any:
    """``SELECT keys, count(*) FROM (rows) GROUP BY keys``: the per-row expressions are computed once, in
    the inner query; SQLite then sorts plain values (3-4x faster at millions of rows than grouping by the
    expressions themselves)."""
    sub = rows.subquery("r")
    cols = [sub.c[k] for k in keys]
    return select(*cols, func.count().label("n")).group_by(*cols)


def _by(*names: str) -> list[Any]:
    """GROUP BY the select's own output columns, by name: each expression is computed once per row."""
    return [literal_column(n) for n in names]


class _Bins:
    """Time bins computed in SQL as cheaply as the dialect allows.

    SQLite: julianday() once per row, no rounding (a millisecond of slack
    puts an event at a bin's edge into that bin); PostgreSQL: epoch seconds.
    Bin k covers [origin + k·width, origin + (k+1)·width).
    """

    def __init__(self, dialect: str, origin: float, width: float) -> None:
        self.sqlite = dialect == "sqlite"
        self.origin, self.width = origin, width

    def tick(self, col: Any) -> Any:
        """A time column in this dialect's unit (days on SQLite, seconds on PostgreSQL)."""
        return func.julianday(col) if self.sqlite else cast(func.extract("epoch", col), Float)

    def seconds(self, s: Any) -> Any:
        """A number of seconds (a SQL expression) in the same unit."""
        return s / 86400.0 if self.sqlite else s

    def at(self, epoch: float) -> float:
        """An epoch time in the same unit."""
        return epoch / 86400.0 + 2440587.5 if self.sqlite else epoch

    def bin(self, tick: Any) -> Any:
        scale = (86400.0 if self.sqlite else 1.0) / self.width
        raw = (tick - self.at(self.origin)) * scale + 1e-3 / self.width
        # on SQLite CAST truncates, which is floor for the times at or after origin this is used for
        return cast(raw, Integer) if self.sqlite else cast(func.floor(raw), Integer)


def _as_time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def depth_changes(conn: Connection, scope: Scope, *, origin: float, width: float, end: float | None,
                  start: float | None = None, single_queue: bool = False, nbins: int | None = None) -> pd.DataFrame:
    """State-changing events per time bin, in one scan: ``bin``, ``event``, ``variant``, ``due_bin``, ``n``.

    ``bin`` = floor((t - origin) / width); events before ``start`` fall in
    bin -1 (the state the window opens with); nothing after ``end`` (None: no
    bound).  ``variant`` tells the two paths of an event apart: for
    ``retry_scheduled`` 1 = the job waits out a back-off (delay > 0) and 2 =
    it came from a reclaimed lease; for ``failed`` 2 = a reclaimed lease (the job was no longer processing),
    for ``cancelled`` 1 = not from processing (pending, released, reclaimed).  ``due_bin`` (retries only) is the bin
    where the back-off ends: the job is pending again from then, if the
    variant says it waited (odd) and that bin is not after ``now``'s.

    Given ``nbins`` (later events count in the last bin, where the caller clamps them), SQLite counts a
    whole queue bin by bin (:func:`_depth_by_range`); a scope joins ``jobs`` per event: one GROUP BY.
    """
    bins = _Bins(_dialect(conn), origin, width)
    at, event = job_events.c.at, job_events.c.event
    delay = job_events.c.detail["delay_s"].as_float()
    outcome = job_events.c.detail["outcome"].as_string()
    extra, cond = _in_scope(scope, single_queue, job_events.c.job_id)
    due_tick = bins.tick(at) + bins.seconds(delay)
    due = bins.bin(due_tick)
    if start is not None:
        due = case((due_tick < bins.at(start), literal(-1)), else_=due)
    retry = event == "retry_scheduled"
    variant = case((retry, case((delay > 0, 1), else_=0) + case((outcome.is_(None), 2), else_=0)),
                   (and_(event == "failed", outcome == "lost"), 2),
                   (and_(event == "cancelled", func.coalesce(outcome, "lost").in_(("released", "lost"))), 1), else_=0)
    # each mention of a JSON field is one more json_extract per row on SQLite: the due bin is computed for
    # every retry, and the caller keeps those of variant 1 or 3 (a back-off) that end by ``now``/``end``
    due_bin = case((retry, due), else_=None)

    def scoped(*cols: Any) -> Any:
        query = select(*cols).select_from(job_events)
        return query if extra is None else query.join(extra, cond[0]).where(*cond[1:])

    if bins.sqlite and extra is None and nbins is not None and nbins <= _MAX_RANGES:
        return _depth_by_range(conn, scoped(event.label("event")),
                               scoped(event.label("event"), variant.label("variant"), due_bin.label("due_bin")),
                               origin=origin, width=width, start=start, end=end, nbins=nbins)
    main_bin = bins.bin(bins.tick(at))
    if start is not None:
        main_bin = case((at < _as_time(start), literal(-1)), else_=main_bin)
    rows = scoped(main_bin.label("bin"), event.label("event"), variant.label("variant"), due_bin.label("due_bin")) \
        .where(event.in_(DEPTH_EVENTS))
    if end is not None:
        rows = rows.where(at <= _as_time(end))
    return run(conn, _counted(rows, "bin", "event", "variant", "due_bin"))


#: the events whose move depends on their detail (a back-off, a lost lease); the others' moves are their counts
_DETAILED = ("retry_scheduled", "failed", "cancelled")
_PLAIN = tuple(e for e in DEPTH_EVENTS if e not in _DETAILED)
#: bins counted one by one in a single UNION ALL (two SELECTs each, ~2 MB of sorter memory per bin while it
#: runs); more bins: one GROUP BY
_MAX_RANGES = 100


def _depth_by_range(conn: Connection, plain: Any, detailed: Any, *, origin: float, width: float,
                    start: float | None, end: float | None, nbins: int) -> pd.DataFrame:
    """:func:`depth_changes` on SQLite, one bin (a range of ``at``) at a time.

    SQLite has no hash aggregation: one GROUP BY over millions of events
    sorts them all.  Per bin, the ``ix_events_moves`` index (event, at,
    detail) holds everything: the plain events are counted per event in index
    order (no sort, no table row), and only retries and failures are grouped,
    a bin's worth at a time.  Edges are compared as stored text, a millisecond
    early like :meth:`_Bins.bin`, so the bins are the same.  One statement
    (a UNION ALL of two SELECTs per bin): one snapshot, one round trip.
    """
    at, event = job_events.c.at, job_events.c.event
    edges = [None] + [origin + k * width - 1e-3 for k in range(1, nbins)] + [None]
    ranges = [(-1, None, start)] if start is not None else []
    for k in range(nbins):
        lo, hi = edges[k], edges[k + 1]
        if start is not None:
            lo = start if lo is None else max(lo, start)
        if lo is None or hi is None or lo < hi:
            ranges.append((k, lo, hi))
    parts = []
    for k, lo, hi in ranges:
        cond = [at <= _as_time(end)] if end is not None else []
        cond += [] if lo is None else [at >= _as_time(lo)]
        cond += [] if hi is None else [at < _as_time(hi)]
        parts.append(plain.add_columns(literal(k).label("bin"), literal(0).label("variant"),
                                       literal(None).label("due_bin"), func.count().label("n"))
                     .where(event.in_(_PLAIN), *cond).group_by(event))
        sub = detailed.where(event.in_(_DETAILED), *cond).subquery()
        parts.append(select(sub.c.event, literal(k).label("bin"), sub.c.variant, sub.c.due_bin, func.count())
                     .group_by(sub.c.event, sub.c.variant, sub.c.due_bin))
    _ensure_math(conn)
    raw = conn.connection.driver_connection
    raw.execute("PRAGMA threads=0")  # a bin's sort is small; a helper thread per sorter only costs memory
    try:
        result = conn.execute(union_all(*parts))  # not run(): it sets threads=2 again
        return pd.DataFrame(result.all(), columns=list(result.keys()))[["bin", "event", "variant", "due_bin", "n"]]
    finally:
        raw.execute("PRAGMA threads=2")


def finished_attempts(conn: Connection, scope: Scope, *, origin: float, width: float, start: float | None,
                      end: float | None, single_queue: bool = False) -> pd.DataFrame:
    """Finished attempts per time bin and outcome: ``bin``, ``outcome``, ``n``."""
    bins = _Bins(_dialect(conn), origin, width)
    fin = job_attempts.c.finished_at
    extra, cond = _in_scope(scope, single_queue, job_attempts.c.job_id)
    rows = select(bins.bin(bins.tick(fin)).label("bin"), job_attempts.c.outcome.label("outcome")) \
        .select_from(job_attempts)
    if extra is not None:
        rows = rows.join(extra, cond[0]).where(*cond[1:])
    rows = rows.where(fin.is_not(None), job_attempts.c.outcome.is_not(None))
    if start is not None:
        rows = rows.where(fin >= _as_time(start))
    if end is not None:
        rows = rows.where(fin <= _as_time(end))
    return run(conn, _counted(rows, "bin", "outcome"))


# ---------------------------------------------------------------- reading (one connection per call)
def read(ledger: LedgerBase, fn: Any, *args: Any, **kw: Any) -> Any:
    """``fn(conn, *args, **kw)`` on a connection of the ledger's read engine."""
    with ledger.read_engine.connect() as conn:
        return fn(conn, *args, **kw)


def read_together(ledger: LedgerBase, *calls: tuple[Any, ...]) -> list[Any]:
    """Each ``(fn, *args)`` of ``calls`` on one connection (one snapshot of the ledger), in order."""
    with ledger.read_engine.connect() as conn:
        return [fn(conn, *args) for fn, *args in calls]


# ---------------------------------------------------------------- one row per thing (qkit.analysis.frames)
def _rows(conn: Connection, query: Any) -> tuple[list[str], list[Any]]:
    result = conn.execute(query)
    return list(result.keys()), result.all()


def job_rows(conn: Connection, queue: str, *, since: datetime | None = None, status: str | None = None,
             type: str | None = None, ids: Sequence[int] | None = None, payload: bool = False
             ) -> tuple[list[str], list[Any]]:
    """(columns, rows) of the queue's jobs, oldest first; ``payload`` adds payload and result."""
    cols = [jobs.c.id, jobs.c.queue, jobs.c.type, jobs.c.status, jobs.c.priority, jobs.c.attempts,
            jobs.c.max_attempts, jobs.c.epoch, jobs.c.error, jobs.c.idempotency_key, jobs.c.run_at,
            jobs.c.created_at, jobs.c.updated_at, jobs.c.started_at, jobs.c.finished_at]
    if payload:
        cols += [jobs.c.payload, jobs.c.result]
    query = select(*cols).where(jobs.c.queue == queue)
    if since is not None:
        query = query.where(jobs.c.created_at >= since)
    if status:
        query = query.where(jobs.c.status == status)
    if type:
        query = query.where(jobs.c.type == type)
    if ids is not None:
        query = query.where(jobs.c.id.in_([int(i) for i in ids]))
    return _rows(conn, query.order_by(jobs.c.id))


def attempt_rows(conn: Connection, queue: str, *, since: datetime | None = None, job_id: int | None = None,
                 traceback: bool = False) -> tuple[list[str], list[Any]]:
    """(columns, rows) of the queue's attempts with their job's type, priority, status, epoch, max_attempts."""
    a = job_attempts
    cols = [a.c.id, a.c.job_id, jobs.c.type, jobs.c.priority, a.c.epoch, a.c.attempt, a.c.worker, a.c.started_at,
            a.c.finished_at, a.c.duration_ms, a.c.outcome, a.c.error, a.c.fingerprint, a.c.retry_after_ms,
            jobs.c.status.label("job_status"), jobs.c.epoch.label("job_epoch"), jobs.c.max_attempts]
    if traceback:
        cols.append(a.c.traceback)
    query = select(*cols).select_from(a.join(jobs, jobs.c.id == a.c.job_id)).where(jobs.c.queue == queue)
    if since is not None:
        query = query.where(jobs.c.created_at >= since)
    if job_id is not None:
        query = query.where(a.c.job_id == int(job_id))
    return _rows(conn, query.order_by(a.c.job_id, a.c.epoch, a.c.attempt))


def event_rows(conn: Connection, queue: str, *, since: datetime | None = None,
               job_id: int | None = None) -> tuple[list[str], list[Any]]:
    """(columns, rows) of the queue's job events, in order."""
    e = job_events
    query = select(e.c.id, e.c.job_id, jobs.c.type, e.c.at, e.c.event, e.c.worker, e.c.detail) \
        .select_from(e.join(jobs, jobs.c.id == e.c.job_id)).where(jobs.c.queue == queue)
    if since is not None:
        query = query.where(jobs.c.created_at >= since)
    if job_id is not None:
        query = query.where(e.c.job_id == int(job_id))
    return _rows(conn, query.order_by(e.c.id))


def run_rows(conn: Connection, queue: str, *, since: datetime | None = None) -> tuple[list[str], list[Any]]:
    """(columns, rows) of the queue's ``worker_runs``, oldest first."""
    query = select(worker_runs).where(worker_runs.c.queue == queue)
    if since is not None:
        query = query.where(worker_runs.c.started_at >= since)
    return _rows(conn, query.order_by(worker_runs.c.id))


def first_due(conn: Connection, queue: str) -> Any:
    """The earliest ``run_at`` of the queue's pending jobs (text on SQLite: ``min()`` loses the type), or None."""
    return conn.execute(select(func.min(jobs.c.run_at)).where(
        and_(jobs.c.queue == queue, jobs.c.status == "pending"))).scalar()

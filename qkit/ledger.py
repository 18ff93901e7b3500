"""The SQL ledger (docs/architecture.md#the-ledger): the source of truth for every job and attempt.

Redis is only the dispatch index.  Each step writes the ledger first and
Redis second, so a crash between the two is repaired from the ledger:

========== ================================= ======================================
step       ledger (first, one transaction)   Redis (second, one script)
========== ================================= ======================================
enqueue    insert ``pending`` rows + events  push ids to ready/delayed
claim      (after Redis) ``processing``,      claim.lua moves ready -> leased
           open attempt rows, events          (Redis first: the lease is the lock)
complete   ``completed``, attempt closed      settle 'done' (drop the lease)
retry      ``pending`` + run_at, attempt      settle 'retry' (lease -> delayed)
dead       ``failed``, attempt closed         settle 'dead' (lease -> DLQ)
replay     ``failed`` -> ``pending``          push in 'repair' mode (DLQ -> ready)
========== ================================= ======================================

Crash windows and their repair: a pending row missing from Redis is pushed
again by the next burst (:mod:`qkit.reconcile`); a Redis entry whose row is
missing or terminal is dropped when claimed, never run; a lease whose ledger
write never happened expires and is reclaimed; an outcome committed but not
settled in Redis is found terminal at reclaim and dropped without a new attempt.
Completion is fenced in SQL: a worker may only settle the attempt the ledger
says is current (status ``processing``, same attempt and replay epoch).
"""
from __future__ import annotations

import json
import queue as queue_mod
import re
import threading
import time
from collections import namedtuple
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

from sqlalchemy import (JSON, BigInteger, case, Column, DateTime, Float, Index, Integer, MetaData, String,
                        Table, Text, TypeDecorator, and_, bindparam, create_engine, delete, event, func,
                        column, insert, select, table, text, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import (DisconnectionError, IntegrityError, InterfaceError, OperationalError, ProgrammingError,
                            SQLAlchemyError)

from qkit import extras, storable
from qkit.backoff import Backoff
from qkit.config import redact
from qkit.dispatch import Settlement, redis_now
from qkit.errors import BackendUnavailable, Conflict, NotFound
from qkit.logs import log
from qkit.model import Job, NewJob


SCHEMA_VERSION = 5  # v2: job_daily (retention roll-ups, qkit/retention.py); v3: SQLite job ids never reused;
#                   v4: worker_runs.run_id (qkit/scheduled.py); v5: a failed job keeps its idempotency key
MAX_TEXT = storable.MAX_ERROR_BYTES  # stored error/traceback text is cut to this many bytes (qkit/storable.py)
#: a retry claimed this much before its run_at still runs: Redis decides due times on its own clock,
#: and run_at is written from an estimate of it (qkit.dispatch.RedisClock)
NOT_DUE_SLACK = timedelta(seconds=1)
#: how long a lease renewer waits for its ``lease_renewed`` event to commit (see Ledger.record_renewal)
RENEWAL_EVENT_WAIT_S = 0.1


def utcnow() -> datetime:
    """qkit's clock, an aware UTC datetime: Redis ``TIME`` as this process last saw it
    (:func:`qkit.dispatch.redis_now`), or before any Redis reply this host's wall clock (``time.time``)."""
    return redis_now() or datetime.fromtimestamp(time.time(), timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on SQLite (which stores naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


Id = BigInteger().with_variant(Integer(), "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid
class _Json(TypeDecorator):
    """JSON, stored as JSONB on PostgreSQL.

    The PostgreSQL dialect is imported only when used: a worker on SQLite
    starts faster without it.
    """

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


Json = _Json()

metadata = MetaData()

schema_info = Table("qkit_schema", metadata, Column("version", Integer, nullable=False))

jobs = Table(
    "jobs", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("queue", String(64), nullable=False),
    Column("type", String(64), nullable=False),
    Column("payload", Json, nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("result", Json),
    Column("error", Text),
    Column("idempotency_key", String(256)),
    Column("run_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("epoch", Integer, nullable=False, default=0),  # bumped by each DLQ replay
    Index("ix_jobs_queue_status", "queue", "status"),
    # every job holds its key, failed ones too, until purged (docs/semantics.md#idempotency)
    Index("uq_jobs_idempotency", "queue", "idempotency_key", unique=True),
    sqlite_autoincrement=True,  # job ids are never reused (docs/semantics.md#the-promise)
)

job_attempts = Table(
    "job_attempts", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("epoch", Integer, nullable=False, default=0),
    Column("attempt", Integer, nullable=False),
    Column("worker", String(128), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("duration_ms", Float),
    Column("outcome", String(16)),  # NULL while the attempt runs
    Column("error", Text),
    Column("traceback", Text),
    Column("fingerprint", String(200)),
    Index("uq_attempts_job", "job_id", "epoch", "attempt", unique=True),
)

worker_runs = Table(
    "worker_runs", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("worker", String(128), nullable=False),
    Column("queue", String(64), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("processed", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("retried", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("trigger", String(16), nullable=False),
    Column("params", Json),
    Column("status", String(16), nullable=False, default="running"),  # running|ok|failed|interrupted|abandoned
    Column("error", Text),
    Column("run_id", String(64)),  # a scheduled run's id: its runner creates the row, the burst continues it
    Index("ix_worker_runs_run_id", "run_id"),
)

job_events = Table(
    "job_events", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("event", String(32), nullable=False),
    Column("worker", String(128)),
    Column("detail", Json),
    Index("ix_events_job", "job_id"),
)

# ---------------------------------------------------------------- retention roll-ups (schema v2)
#: One row per (UTC day of finishing, queue, type) of completed jobs that
#: ``qkit prune`` deleted (qkit/retention.py), so analyses still cover pruned
#: days.  Counts and sums are exact; ``histograms`` holds mergeable log-bucket
#: histograms of execution and wait times, the source of the p50/p95 columns.
job_daily = Table(
    "job_daily", metadata,
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD (UTC), the day the jobs finished
    Column("queue", String(64), primary_key=True),
    Column("type", String(64), primary_key=True),
    Column("completed", Integer, nullable=False, default=0),  # jobs
    Column("attempts", Integer, nullable=False, default=0),  # attempt rows of those jobs, every epoch
    Column("retried", Integer, nullable=False, default=0),  # jobs that needed more than one attempt
    Column("failed_attempts", Integer, nullable=False, default=0),
    Column("timeout_attempts", Integer, nullable=False, default=0),
    Column("lost_attempts", Integer, nullable=False, default=0),
    Column("total_duration_ms", Float, nullable=False, default=0.0),  # every attempt's duration
    Column("exec_ms_sum", Float, nullable=False, default=0.0),  # the completed attempts' durations
    Column("exec_p50_ms", Float),
    Column("exec_p95_ms", Float),
    Column("wait_ms_sum", Float, nullable=False, default=0.0),  # enqueue -> first claim
    Column("wait_p50_ms", Float),
    Column("wait_p95_ms", Float),
    Column("histograms", Json),
    Column("updated_at", UTCDateTime, nullable=False),
)


def _migrate_v2(conn: Connection) -> None:
    """v1 -> v2: add ``job_daily`` (no existing table changes)."""
    job_daily.create(conn, checkfirst=True)


def _migrate_v3(conn: Connection) -> None:
    """v2 -> v3 (SQLite only): ``jobs.id`` becomes AUTOINCREMENT, so ids are never reused.

    SQLite cannot add AUTOINCREMENT to a column: the table is rebuilt under the
    same name (rows and ids kept), and its id sequence starts past the highest
    job id the ledger still remembers, history of purged jobs included.
    """
    if conn.dialect.name != "sqlite":
        return  # PostgreSQL's sequence never hands out an id twice
    ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").scalar()
    if "AUTOINCREMENT" not in (ddl or "").upper():
        from sqlalchemy.schema import DropIndex

        for index in jobs.indexes:  # index names are global in SQLite: free them for the new table
            conn.execute(DropIndex(index, if_exists=True))
        conn.exec_driver_sql("ALTER TABLE jobs RENAME TO jobs_v2")
        jobs.create(conn)
        conn.exec_driver_sql(_DROP_KEY_INDEX)  # older rows may share a key: v5 settles that, then indexes again
        names = [c.name for c in jobs.c]
        old_rows = table("jobs_v2", *(column(name) for name in names))
        conn.execute(jobs.insert().from_select(names, select(*old_rows.c)))
        conn.exec_driver_sql("DROP TABLE jobs_v2")
    top = conn.exec_driver_sql(
        "SELECT MAX(COALESCE((SELECT MAX(id) FROM jobs), 0), COALESCE((SELECT MAX(job_id) FROM job_events), 0),"
        " COALESCE((SELECT MAX(job_id) FROM job_attempts), 0))").scalar()
    if not conn.exec_driver_sql("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'jobs'", (top,)).rowcount:
        conn.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (top,))


_DROP_KEY_INDEX = "DROP INDEX IF EXISTS uq_jobs_idempotency"
_KEY_RELEASED = "idempotency key released to job {} by the v5 upgrade"


def _migrate_v5(conn: Connection) -> None:
    """v4 -> v5: a failed job keeps its idempotency key; the partial unique index becomes a full one.

    Under the old rule a failed job freed its key, so several rows may share
    one: the key stays on the job that held it (the one not failed, else the
    newest) and is cleared from the others, each of which gets a ``repaired``
    event saying so (the key's value is not repeated there).
    """
    conn.exec_driver_sql(_DROP_KEY_INDEX)
    shared = (select(jobs.c.queue, jobs.c.idempotency_key).where(jobs.c.idempotency_key.is_not(None))
              .group_by(jobs.c.queue, jobs.c.idempotency_key).having(func.count() > 1).subquery())
    rows = conn.execute(select(jobs.c.id, jobs.c.queue, jobs.c.idempotency_key, jobs.c.status).join(
        shared, and_(jobs.c.queue == shared.c.queue, jobs.c.idempotency_key == shared.c.idempotency_key))).all()
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in rows:
        groups.setdefault((r.queue, r.idempotency_key), []).append(r)
    cleared: list[tuple[int, int]] = []
    for group in groups.values():
        keeper = max(group, key=lambda r: (r.status != "failed", r.id)).id
        cleared += [(r.id, keeper) for r in group if r.id != keeper]
    if cleared:
        conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id")).values(idempotency_key=None),
                     [dict(b_id=job_id) for job_id, _ in cleared])
        now = utcnow()
        conn.execute(insert(job_events), [
            dict(job_id=job_id, at=now, event="repaired", worker=None, detail={"action": _KEY_RELEASED.format(keeper)})
            for job_id, keeper in cleared])
    next(i for i in jobs.indexes if i.name == "uq_jobs_idempotency").create(conn)


_SYNC_PRAGMAS = {"FULL": "PRAGMA synchronous=FULL", "NORMAL": "PRAGMA synchronous=NORMAL"}


def _migrate_worker_run_ids(conn: Connection) -> None:
    """Add ``worker_runs.run_id`` (indexed), filled from the ``params.run_id`` earlier runs recorded."""
    from sqlalchemy import inspect as inspect_db

    if "run_id" not in {c["name"] for c in inspect_db(conn).get_columns("worker_runs")}:
        conn.exec_driver_sql("ALTER TABLE worker_runs ADD COLUMN run_id VARCHAR(64)")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_worker_runs_run_id ON worker_runs (run_id)")
    conn.exec_driver_sql(_FILL_RUN_IDS[conn.dialect.name == "postgresql"])


_FILL_RUN_IDS = {  # constant statements, one per dialect (no SQL is built from values)
    False: "UPDATE worker_runs SET run_id = SUBSTR(CAST(json_extract(params, '$.run_id') AS TEXT), 1, 64) "
           "WHERE run_id IS NULL AND params IS NOT NULL AND json_extract(params, '$.run_id') IS NOT NULL",
    True: "UPDATE worker_runs SET run_id = SUBSTR(CAST(params ->> 'run_id' AS TEXT), 1, 64) "
          "WHERE run_id IS NULL AND params IS NOT NULL AND params ->> 'run_id' IS NOT NULL",
}


_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.I)
_HEX = re.compile(r"\b(?:0x)?[0-9a-f]{8,}\b|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def fingerprint(error: str | None) -> str | None:
    """The error's type plus its message with numbers, ids and quoted values normalised."""
    if not error:
        return None
    text_ = _QUOTED.sub("'?'", error.splitlines()[0])
    text_ = _HEX.sub("<id>", text_)
    text_ = _NUMBER.sub("<n>", text_)
    return text_[:200]


class DriverSQL:
    """Hot-path statements sent straight to the DB-API driver.

    SQLAlchemy's per-row bind processing cost more than the rest of a no-op
    job; these few statements take values already in the driver's form.
    Statements are written with ``?`` placeholders and ``{json}`` for a JSON
    parameter (compact text, or None for SQL NULL).
    """

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        self._last_ts: tuple[Any, Any] = (None, None)

    def sql(self, statement: str) -> str:
        if self.pg:
            return statement.replace("?", "%s").replace("{json}", "%s::jsonb")
        return statement.replace("{json}", "?")

    def ts(self, value: datetime | None) -> Any:
        """A UTC time as the driver stores it (SQLAlchemy's SQLite text format)."""
        if value is None or self.pg:
            return value
        if value is self._last_ts[0]:  # a batch stamps many rows with the same time
            return self._last_ts[1]
        text_ = value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        self._last_ts = (value, text_)
        return text_

    def run(self, conn: Connection, statement: str, rows: Sequence[tuple]) -> None:
        if rows:
            conn.exec_driver_sql(self.sql(statement), list(rows) if len(rows) > 1 else rows[0])

    def select_ids(self, conn: Connection, statement: str, ids: Sequence[int], *, lock: bool = False) -> list:
        """Rows of ``statement`` (``... WHERE id {ids}``) for the given ids, as plain tuples.

        The id list travels as one parameter (``= ANY(%s)`` / ``json_each(?)``), so the
        statement text is the same for every batch and the driver's cache keeps it prepared.
        """
        sql_ = self.with_ids(statement) + (" FOR UPDATE" if lock and self.pg else "")
        return conn.exec_driver_sql(sql_, (self.ids_arg(ids),)).all()

    def with_ids(self, statement: str) -> str:
        """``statement`` with ``{ids}`` taking a whole id list as one parameter."""
        return self.sql(statement.replace("{ids}", "= ANY(?)" if self.pg else "IN (SELECT value FROM json_each(?))"))

    def ids_arg(self, ids: Sequence[int]) -> Any:
        return list(ids) if self.pg else json.dumps(list(ids))

    def json_in(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def payload_in(self, value: Any) -> Any:
        """A stored payload, or None when it is not JSON (a row written behind qkit's back):
        the worker fails that one job as invalid instead of every claim failing."""
        try:
            return self.json_in(value)
        except ValueError:
            return None

    def ts_in(self, value: Any) -> datetime | None:
        if value is None or isinstance(value, datetime):
            return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
        return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)


ClaimRow = namedtuple("ClaimRow", "id status type payload priority attempts max_attempts epoch run_at")
SELECT_CLAIM = ("SELECT id, status, type, payload, priority, attempts, max_attempts, epoch, run_at, queue"
                " FROM jobs WHERE id {ids}")
OpenAttempt = namedtuple("OpenAttempt", "job_id attempt worker started_at epoch")
SELECT_OPEN = ("SELECT job_id, attempt, worker, started_at, epoch FROM job_attempts"
               " WHERE job_id {ids} AND outcome IS NULL")
FenceRow = namedtuple("FenceRow", "id status attempts epoch")
SELECT_FENCE = "SELECT id, status, attempts, epoch FROM jobs WHERE id {ids}"
INSERT_JOB = ("INSERT INTO jobs (id, queue, type, payload, status, priority, attempts, max_attempts, run_at,"
              " created_at, updated_at, epoch) VALUES (?, ?, ?, {json}, 'pending', ?, 0, ?, ?, ?, ?, 0)")
INSERT_EVENT = "INSERT INTO job_events (job_id, at, event, worker, detail) VALUES (?, ?, ?, ?, {json})"
INSERT_ATTEMPT = "INSERT INTO job_attempts (job_id, epoch, attempt, worker, started_at) VALUES (?, ?, ?, ?, ?)"
CLAIM_JOBS = ("UPDATE jobs SET status = 'processing', attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
              " updated_at = ? WHERE id {ids}")
SETTLE_JOB = ("UPDATE jobs SET status = ?, result = {json}, error = ?, finished_at = ?,"
              " run_at = COALESCE(?, run_at), updated_at = ? WHERE id = ?")
SETTLE_ATTEMPT = ("UPDATE job_attempts SET outcome = ?, finished_at = ?, duration_ms = ?, error = ?, traceback = ?,"
                  " fingerprint = ? WHERE job_id = ? AND epoch = ? AND attempt = ?")


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


@dataclass
class Outcome:
    """How one attempt ended, as the worker reports it."""

    job: Runnable
    outcome: str  # completed | failed | timeout | released
    finished_at: datetime
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    permanent: bool = False  # no retry (unknown type)


@dataclass
class ClaimPlan:
    runnable: list[Runnable] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)
    lost: int = 0
    retried: int = 0
    failed: int = 0


@dataclass
class SettlePlan:
    settlements: list[Settlement] = field(default_factory=list)
    fenced: list[int] = field(default_factory=list)
    completed: int = 0
    retried: int = 0
    failed: int = 0

    def merge(self, other: "SettlePlan") -> None:
        self.settlements += other.settlements
        self.fenced += other.fenced
        self.completed += other.completed
        self.retried += other.retried
        self.failed += other.failed


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the ledger could not be reached (worth retrying), not that it refused the data."""
    return (isinstance(exc, (BackendUnavailable, OperationalError, InterfaceError, DisconnectionError))
            or bool(getattr(exc, "connection_invalidated", False)))


def unstorable(o: Outcome, exc: BaseException) -> Outcome:
    """The outcome recorded instead of one the ledger refused: failed, with a clean error and no job data."""
    return Outcome(o.job, "failed", o.finished_at, permanent=True,
                   error=f"OutcomeNotStored: the ledger refused this job's {o.outcome} outcome "
                         f"({type(exc).__name__}); its handler had finished")


def _row_to_job(row: Any) -> Job:
    m = row._mapping
    return Job(**{name: m[name] for name in Job.__dataclass_fields__})


class Ledger:
    """The ledger database, through SQLAlchemy 2 (SQLite in WAL mode, or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            if url.startswith("sqlite"):
                self.engine = self._sqlite_engine(url, immediate=True)
                self.read_engine = self._sqlite_engine(url, immediate=False)
            else:
                # hide_parameters: a failed statement's message never carries job data (payloads,
                # results, keys) into logs or stored errors
                self.engine = create_engine(url, pool_pre_ping=True, json_serializer=_dumps, hide_parameters=True)
                self.read_engine = self.engine
        except (SQLAlchemyError, ImportError) as exc:
            missing = extras.explain(exc, "a PostgreSQL ledger") if isinstance(exc, ModuleNotFoundError) else None
            raise missing or BackendUnavailable(f"cannot open the ledger at QKIT_DATABASE_URL={redact(url)}: {exc}") \
                from None
        for engine in {self.engine, self.read_engine}:
            event.listen(engine, "handle_error", _first_line_only)
        self.dialect = self.engine.dialect.name
        #: writes whose commit acknowledges something to a user (enqueue, replay, purge): on SQLite
        #: they commit with synchronous=FULL, so an acknowledged enqueue survives a power loss
        #: (docs/semantics.md#the-promise); the worker's own writes keep NORMAL (a lost outcome is re-run, never lost)
        self.durable_engine = self.engine.execution_options(qkit_durable=True)
        self.driver = DriverSQL(self.dialect)
        self.statements = 0  # SQL statements sent, for cost figures
        self._writer: _EventWriter | None = None  # background writer of lease_renewed events
        self._writer_lock = threading.Lock()

    @staticmethod
    def _sqlite_engine(url: str, immediate: bool) -> Engine:
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if path and path != ":memory:":
            from pathlib import Path

            from qkit.config import private_file

            private_file(Path(path))  # 0600 before SQLite opens it: its -wal and -shm files get the same mode
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               json_serializer=_dumps, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, record: Any) -> None:
            dbapi_conn.isolation_level = None  # qkit emits BEGIN itself, below
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()
            record.info["qkit_sync"] = "NORMAL"

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # the sync level is per connection and SQLite refuses to change it inside a
            # transaction: set it before BEGIN, for this transaction (Ledger.durable_engine)
            level = "FULL" if conn.get_execution_options().get("qkit_durable") else "NORMAL"
            info = conn.connection.info
            if info.get("qkit_sync") != level:
                conn.exec_driver_sql(_SYNC_PRAGMAS[level])
                info["qkit_sync"] = level
            # writers take the lock up front: a deferred transaction that later
            # upgrades to a writer can fail with SQLITE_BUSY instead of waiting
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    # ------------------------------------------------------------------ plumbing
    def _write(self, durable: bool = False):
        try:
            return (self.durable_engine if durable else self.engine).begin()
        except OperationalError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        first = str(getattr(exc, "orig", exc)).strip().splitlines()
        return BackendUnavailable(f"cannot use the ledger at QKIT_DATABASE_URL={redact(self.url)}: "
                                  f"{redact(first[0]) if first else type(exc).__name__}")

    def describe(self) -> str:
        return redact(self.url)

    def _insert(self, table: Table):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        return dialect_insert(table)

    # ------------------------------------------------------------------ schema
    def schema_version(self) -> int | None:
        """The ledger's schema version, or None while it has no tables."""
        try:
            with self.read_engine.connect() as conn:
                return conn.execute(select(schema_info.c.version)).scalar()
        except (OperationalError, ProgrammingError):
            return None  # no such table yet (or no database: init_schema says which)

    def init_schema(self) -> int:
        """Create or upgrade the tables in place; return the schema version."""
        if self.schema_version() == SCHEMA_VERSION:
            return SCHEMA_VERSION  # every connect asks; one query answers
        try:
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # concurrent first connects would race on CREATE TABLE: one creator at a time
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(724731)")
                metadata.create_all(conn, checkfirst=True)
                version = conn.execute(select(schema_info.c.version)).scalar()
                if version is None:
                    conn.execute(insert(schema_info).values(version=SCHEMA_VERSION))
                    version = SCHEMA_VERSION
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[target](conn)
                    conn.execute(update(schema_info).values(version=target))
                    version = target
        except OperationalError as exc:
            raise self._unavailable(exc) from None
        return version

    def ping(self) -> bool:
        try:
            with self.read_engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None
        return True

    # ------------------------------------------------------------------ enqueue
    def insert_jobs(self, queue: str, new: Sequence[NewJob], now: datetime | None = None) -> list[tuple[int, bool]]:
        """Insert jobs as ``pending``; returns (id, created) per item, in order.

        An idempotency key held by any job of the queue, failed ones included,
        returns that job's id (created False); the database's unique index
        decides, so concurrent callers agree.
        """
        now = now or utcnow()
        results: list[tuple[int, bool] | None] = [None] * len(new)

        def row(j: NewJob) -> dict[str, Any]:
            return dict(queue=queue, type=j.type, payload=j.payload, status="pending", priority=j.priority,
                        attempts=0, max_attempts=j.max_attempts, idempotency_key=j.key,
                        run_at=now + timedelta(seconds=j.delay), created_at=now, updated_at=now, epoch=0)

        with self._write(durable=True) as conn:
            plain = [i for i, j in enumerate(new) if j.key is None]
            if plain:
                ids = self._reserve_ids(conn, len(plain))
                d = self.driver
                self.driver.run(conn, INSERT_JOB, [
                    (job_id, queue, new[i].type, new[i].payload_text, new[i].priority, new[i].max_attempts,
                     d.ts(now + timedelta(seconds=new[i].delay)), d.ts(now), d.ts(now))
                    for i, job_id in zip(plain, ids)])
                self.statements += 2
                for i, job_id in zip(plain, ids):
                    results[i] = (job_id, True)
            for i, j in enumerate(new):
                if j.key is not None:
                    results[i] = self._insert_keyed(conn, queue, row(j), j.key)
            at = self.driver.ts(now)
            self.driver.run(conn, INSERT_EVENT, [
                (r[0], at, "enqueued", None, None) if r[1] else
                (r[0], at, "deduplicated", None, _dumps({"key": new[i].key}))
                for i, r in enumerate(results) if r is not None])
            self.statements += 1
        return [r for r in results if r is not None]

    def _insert_keyed(self, conn: Connection, queue: str, values: dict[str, Any], key: str) -> tuple[int, bool]:
        """Insert one job with an idempotency key, or return the id of the job holding the key.

        A job keeps its key until it is purged.  On PostgreSQL a purge can delete
        the holder between the conflicting insert and the fetch, each statement
        seeing the latest commits: then nothing holds the key any more and the
        insert is tried again.  Every round either inserts, or finds a holder,
        or saw a holder purged since the previous round, so the loop ends.
        """
        stmt = (self._insert(jobs).values(**values)
                .on_conflict_do_nothing(index_elements=["queue", "idempotency_key"]).returning(jobs.c.id))
        holder = select(jobs.c.id).where(jobs.c.queue == queue, jobs.c.idempotency_key == key)
        while True:
            job_id = conn.execute(stmt).scalar()
            self.statements += 1
            if job_id is not None:
                return int(job_id), True
            existing = conn.execute(holder).scalar()
            self.statements += 1
            if existing is not None:
                return int(existing), False

    def _reserve_ids(self, conn: Connection, n: int) -> list[int]:
        """Ids for ``n`` new jobs, in order: they are the FIFO sequence within a priority.

        Never an id any job had before (docs/semantics.md#the-promise): PostgreSQL's sequence only
        moves forward; on SQLite ``jobs`` is AUTOINCREMENT (schema v3), whose
        ``sqlite_sequence`` row remembers the highest id ever inserted, also
        after those rows were purged, and moves up with the explicit ids inserted here.
        """
        if self.dialect == "postgresql":
            rows = conn.exec_driver_sql(
                "SELECT nextval(pg_get_serial_sequence('jobs', 'id')) FROM generate_series(1, %s)", (n,))
            return sorted(int(r[0]) for r in rows)
        # SQLite: this transaction holds the write lock (BEGIN IMMEDIATE), so neither can move
        top = conn.exec_driver_sql(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM jobs), 0),"
            " COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0))").scalar()
        return list(range(int(top) + 1, int(top) + n + 1))

    # ------------------------------------------------------------------ reads
    def get(self, job_id: int, queue: str | None = None) -> Job:
        """One job; NotFound if there is none (in that queue)."""
        query = select(jobs).where(jobs.c.id == job_id)
        if queue is not None:
            query = query.where(jobs.c.queue == queue)
        with self.read_engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            where = f" in queue {queue!r}" if queue else ""
            raise NotFound(f"no job {job_id}{where}")
        return _row_to_job(row)

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        with self.read_engine.connect() as conn:
            rows = conn.execute(select(job_attempts).where(job_attempts.c.job_id == job_id)
                                .order_by(job_attempts.c.epoch, job_attempts.c.attempt)).mappings().all()
        return [dict(r) for r in rows]

    def events(self, job_id: int) -> list[dict[str, Any]]:
        with self.read_engine.connect() as conn:
            rows = conn.execute(select(job_events).where(job_events.c.job_id == job_id)
                                .order_by(job_events.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def list_jobs(self, queue: str, *, status: str | None = None, type: str | None = None,
                  limit: int = 100, before_id: int | None = None) -> list[Job]:
        """Newest first, optionally filtered; ``before_id`` pages backwards."""
        return [_row_to_job(r) for r in self._list(select(jobs), queue, status, type, limit, before_id)]

    def job_summaries(self, queue: str, *, status: str | None = None, type: str | None = None,
                      limit: int = 100, before_id: int | None = None, error_chars: int = 1000) -> list[dict[str, Any]]:
        """Like :meth:`list_jobs` but as dicts without payload and result, and with ``error``
        cut to ``error_chars``: a listing of 1,000 jobs of 256 KiB payloads would be 256 MB."""
        columns = [c for c in jobs.c if c.name not in ("payload", "result", "error")]
        query = select(*columns, func.substr(jobs.c.error, 1, error_chars).label("error"))
        try:
            return [dict(r._mapping) for r in self._list(query, queue, status, type, limit, before_id)]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def _list(self, query: Any, queue: str, status: str | None, type: str | None, limit: int,
              before_id: int | None) -> list[Any]:
        query = query.where(jobs.c.queue == queue)
        if status:
            query = query.where(jobs.c.status == status)
        if type:
            query = query.where(jobs.c.type == type)
        if before_id is not None:
            query = query.where(jobs.c.id < before_id)
        with self.read_engine.connect() as conn:
            return conn.execute(query.order_by(jobs.c.id.desc()).limit(limit)).all()

    def status_counts(self, queue: str, now: datetime | None = None) -> dict[str, int]:
        """Jobs per status, and pending split into due and delayed, in one query."""
        now = now or utcnow()
        due = func.coalesce(func.sum(case((and_(jobs.c.status == "pending", jobs.c.run_at <= now), 1), else_=0)), 0)
        with self.read_engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count(), due).where(jobs.c.queue == queue)
                                .group_by(jobs.c.status)).all()
        counts = {s: 0 for s in ("pending", "processing", "completed", "failed")}
        due_total = 0
        for status, n, d in rows:
            counts[status] = int(n)
            due_total += int(d or 0)
        counts["due"] = due_total
        counts["delayed"] = counts["pending"] - due_total
        return counts

    def exec_stats(self, queue: str) -> dict[str, Any]:
        """Average execution time of completed attempts, and attempt outcomes."""
        with self.read_engine.connect() as conn:
            rows = conn.execute(
                select(job_attempts.c.outcome, func.count(), func.avg(job_attempts.c.duration_ms))
                .select_from(job_attempts.join(jobs, jobs.c.id == job_attempts.c.job_id))
                .where(jobs.c.queue == queue).group_by(job_attempts.c.outcome)).all()
        out: dict[str, Any] = {"attempts": {}, "avg_exec_ms": None}
        for outcome, n, avg in rows:
            out["attempts"][outcome or "running"] = int(n)
            if outcome == "completed" and avg is not None:
                out["avg_exec_ms"] = round(float(avg), 3)
        return out

    def active_rows(self, queue: str) -> list[tuple[int, str, int, datetime, int]]:
        """(id, status, priority, run_at, epoch) of every pending, processing or failed job."""
        with self.read_engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(jobs.c.id, jobs.c.status, jobs.c.priority, jobs.c.run_at, jobs.c.epoch)
                .where(jobs.c.queue == queue, jobs.c.status.in_(("pending", "processing", "failed"))))]

    def existing_ids(self, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        found: set[int] = set()
        with self.read_engine.connect() as conn:
            for start in range(0, len(ids), 500):
                found |= set(conn.execute(select(jobs.c.id).where(jobs.c.id.in_(ids[start:start + 500]))).scalars())
        return found

    def correct_times(self, due: Sequence[tuple[int, datetime]], at: datetime, created: bool) -> None:
        """Re-write run_at (and updated_at, and created_at if ``created``) of jobs still pending and never
        run, written from a host clock found off Redis's (see ``Queue._correct_times``)."""
        if not due:
            return
        values: dict[str, Any] = dict(run_at=bindparam("b_run_at"), updated_at=at)
        if created:
            values["created_at"] = at
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id"), jobs.c.status == "pending",
                                            jobs.c.attempts == 0).values(**values),
                         [dict(b_id=job_id, b_run_at=run_at) for job_id, run_at in due])
            self.statements += 1

    def dead(self, queue: str, limit: int | None = None) -> list[Job]:
        """The DLQ: failed jobs, newest failure first."""
        query = select(jobs).where(jobs.c.queue == queue, jobs.c.status == "failed") \
            .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc())
        if limit:
            query = query.limit(limit)
        with self.read_engine.connect() as conn:
            return [_row_to_job(r) for r in conn.execute(query)]

    # ------------------------------------------------------------------ claim
    def claim(self, queue: str, worker: str, job_ids: Sequence[int], reclaimed: dict[int, str],
              backoff: Backoff, now: datetime | None = None, again: bool = False) -> ClaimPlan:
        """Record the claim of ids Redis just leased to ``worker``.

        Rows that are missing or already terminal are dropped (settlement
        'done', never run).  A row still ``processing`` had an attempt that
        never finished: it is closed as ``lost`` and the job is retried or
        dead-lettered like any failure.  The rest get an open attempt row.
        With ``again`` (a retry of a call whose commit went unanswered), an
        attempt this worker already opened is taken as it is, not as lost.
        """
        now = now or utcnow()
        plan = ClaimPlan()
        ids = list(dict.fromkeys(list(reclaimed) + list(job_ids)))
        if not ids:
            return plan
        with self._write() as conn:
            d = self.driver
            # another queue's id written into this queue's keys is no job of this queue: dropped, never run
            rows = {r[0]: ClaimRow(r[0], r[1], r[2], d.payload_in(r[3]), r[4], r[5], r[6], r[7], d.ts_in(r[8]))
                    for r in d.select_ids(conn, SELECT_CLAIM, ids, lock=True) if r[9] == queue}
            open_attempts = {}
            in_flight = [i for i in ids if i in rows and rows[i].status == "processing"]
            if in_flight:
                open_attempts = {r[0]: OpenAttempt(r[0], r[1], r[2], d.ts_in(r[3]), r[4])
                                 for r in d.select_ids(conn, SELECT_OPEN, in_flight)}
            self.statements += 2
            claim_rows, attempt_rows, event_rows, lost_rows, job_updates = [], [], [], [], []
            for job_id in ids:
                r = rows.get(job_id)
                if r is None or r.status not in ("pending", "processing"):
                    # finished already (its settle never reached Redis): drop it, or put it back in the DLQ
                    failed = r is not None and r.status == "failed"
                    plan.settlements.append(Settlement(job_id, "dead" if failed else "done", 0,
                                                       r.priority if failed else 0))
                    continue
                attempts = r.attempts
                if r.status == "pending" and r.attempts > 0 and r.run_at > now + NOT_DUE_SLACK:
                    # a retry whose Redis settle never arrived (its lease expired instead): not due
                    # before run_at (docs/semantics.md#order), so it goes back to wait, without an attempt
                    wait_ms = int((r.run_at - now).total_seconds() * 1000)
                    plan.settlements.append(Settlement(job_id, "retry", wait_ms, r.priority))
                    continue
                previous = open_attempts.get(job_id)
                if again and r.status == "processing" and previous is not None and previous.worker == worker:
                    plan.runnable.append(Runnable(id=job_id, type=r.type, payload=r.payload, priority=r.priority,
                                                  attempt=previous.attempt, max_attempts=r.max_attempts,
                                                  epoch=r.epoch, started_at=previous.started_at))
                    continue
                if r.status == "processing":
                    # the previous holder's lease expired: that attempt was lost
                    plan.lost += 1
                    holder = previous.worker if previous else (reclaimed.get(job_id) or "unknown")
                    error = f"lost: worker {holder} stopped renewing its lease (process died or stalled)"
                    if previous is not None:
                        duration = (now - previous.started_at).total_seconds() * 1000
                        lost_rows.append(dict(b_job=job_id, b_epoch=previous.epoch, b_attempt=previous.attempt,
                                              finished_at=now, duration_ms=duration, error=error,
                                              fingerprint=fingerprint(error)))
                    event_rows.append(dict(job_id=job_id, at=now, event="reclaimed", worker=worker,
                                           detail={"from_worker": holder, "lost_attempt": attempts}))
                    if attempts >= r.max_attempts:
                        job_updates.append(dict(b_id=job_id, status="failed", run_at=now, error=error,
                                                finished_at=now, attempts=attempts))
                        event_rows += [dict(job_id=job_id, at=now, event="failed", worker=worker,
                                            detail={"attempt": attempts, "outcome": "lost"}),
                                       dict(job_id=job_id, at=now, event="dead", worker=worker, detail=None)]
                        plan.settlements.append(Settlement(job_id, "dead", 0, r.priority))
                        plan.failed += 1
                        continue
                    delay = backoff.delay(job_id, r.epoch, attempts)
                    if delay > 0:
                        job_updates.append(dict(b_id=job_id, status="pending", run_at=now + timedelta(seconds=delay),
                                                error=error, finished_at=None, attempts=attempts))
                        event_rows.append(dict(job_id=job_id, at=now, event="retry_scheduled", worker=worker,
                                               detail={"attempt": attempts, "delay_s": round(delay, 3)}))
                        plan.settlements.append(Settlement(job_id, "retry", int(delay * 1000), r.priority))
                        plan.retried += 1
                        continue
                attempt = attempts + 1
                claim_rows.append(dict(b_id=job_id, attempts=attempt, now=now))
                attempt_rows.append(dict(job_id=job_id, epoch=r.epoch, attempt=attempt, worker=worker, started_at=now))
                event_rows.append(dict(job_id=job_id, at=now, event="claimed", worker=worker,
                                       detail=f'{{"attempt":{attempt}}}'))
                plan.runnable.append(Runnable(id=job_id, type=r.type, payload=r.payload, priority=r.priority,
                                              attempt=attempt, max_attempts=r.max_attempts, epoch=r.epoch,
                                              started_at=now))
            if lost_rows:
                conn.execute(update(job_attempts).where(
                    job_attempts.c.job_id == bindparam("b_job"), job_attempts.c.epoch == bindparam("b_epoch"),
                    job_attempts.c.attempt == bindparam("b_attempt"), job_attempts.c.outcome.is_(None))
                    .values(outcome="lost", finished_at=bindparam("finished_at"),
                            duration_ms=bindparam("duration_ms"), error=bindparam("error"),
                            fingerprint=bindparam("fingerprint")), lost_rows)
                self.statements += 1
            if job_updates:
                conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id")).values(
                    status=bindparam("status"), run_at=bindparam("run_at"), error=bindparam("error"),
                    finished_at=bindparam("finished_at"), attempts=bindparam("attempts"), updated_at=now),
                    job_updates)
                self.statements += 1
            if claim_rows:
                # one statement for the whole batch: every claimed row gets its next attempt
                at = self.driver.ts(now)
                conn.exec_driver_sql(self.driver.with_ids(CLAIM_JOBS),
                                     (at, at, self.driver.ids_arg([r["b_id"] for r in claim_rows])))
                self.driver.run(conn, INSERT_ATTEMPT, [(a["job_id"], a["epoch"], a["attempt"], worker, at)
                                                       for a in attempt_rows])
                self.statements += 2
            self._insert_events(conn, event_rows)
        return plan

    # ------------------------------------------------------------------ settle
    def settle(self, worker: str, outcomes: Sequence[Outcome], backoff: Backoff,
               now: datetime | None = None, again: bool = False) -> SettlePlan:
        """Record how attempts ended, fenced: only the attempt the ledger holds as current counts.

        Outcome text the ledger cannot store is escaped or cut and flagged
        (:mod:`qkit.storable`).  If the batch's transaction still fails for a
        reason other than the ledger being unreachable, the outcomes are written
        one by one, so only a job whose own outcome is refused fails, recorded
        as ``OutcomeNotStored``.  ``again``: an earlier call with these outcomes
        may have committed without an answer (see :meth:`_settle`).
        """
        now = now or utcnow()
        try:
            return self._settle(worker, outcomes, backoff, now, again)
        except Exception as exc:  # noqa: BLE001 - sorted below: unreachable ledgers are the caller's to retry
            if transient(exc):
                raise
            first = exc
        log.warning("could not record a batch of %d outcomes (%s): recording them one by one",
                    len(outcomes), type(first).__name__)
        plan = SettlePlan()
        for o in outcomes:
            try:
                part = self._settle(worker, [o], backoff, now, again)
            except Exception as exc:  # noqa: BLE001
                if transient(exc):
                    raise
                log.warning("job %s: its outcome could not be stored (%s); recorded as failed",
                            o.job.id, type(exc).__name__)
                part = self._settle(worker, [unstorable(o, exc)], backoff, now, again)
            plan.merge(part)
        return plan

    def _settle(self, worker: str, outcomes: Sequence[Outcome], backoff: Backoff, now: datetime,
                again: bool) -> SettlePlan:
        """One transaction for ``outcomes``.

        With ``again``, a job whose row no longer is at this attempt's
        ``processing`` but still at this attempt and epoch was settled by an
        earlier call whose commit went unanswered (or marked lost by a
        reclaimer): Redis is told what the ledger holds instead of fencing it.
        """
        plan = SettlePlan()
        if not outcomes:
            return plan
        pg = self.driver.pg
        with self._write() as conn:
            current = {r[0]: FenceRow(*r) for r in self.driver.select_ids(
                conn, SELECT_FENCE, [o.job.id for o in outcomes], lock=True)}
            self.statements += 1
            d = self.driver
            at = d.ts(now)
            # rows in the driver's form, built directly: this loop runs once per job
            job_rows: list[tuple] = []
            attempt_rows: list[tuple] = []
            event_rows: list[dict[str, Any]] = []
            released: list[dict[str, Any]] = []
            for o in outcomes:
                j = o.job
                r = current.get(j.id)
                if r is None or r.status != "processing" or r.attempts != j.attempt or r.epoch != j.epoch:
                    if again and r is not None and r.attempts == j.attempt and r.epoch == j.epoch:
                        action = {"completed": "done", "failed": "dead"}.get(r.status, "retry")
                        plan.settlements.append(Settlement(j.id, action, 0, j.priority))
                        continue
                    plan.fenced.append(j.id)
                    continue
                if o.outcome == "released":
                    released.append(dict(b_id=j.id, b_epoch=j.epoch, b_attempt=j.attempt))
                    event_rows.append(dict(job_id=j.id, at=now, event="released", worker=worker,
                                           detail={"attempt": j.attempt}))
                    plan.settlements.append(Settlement(j.id, "retry", 0, j.priority))
                    continue
                duration = (o.finished_at - j.started_at).total_seconds() * 1000
                finished = d.ts(o.finished_at)
                result, escaped = None, False
                if o.outcome == "completed":
                    try:
                        result, escaped = storable.result_json(o.result, pg)
                    except ValueError as exc:
                        o = unstorable(o, exc)
                error = storable.text(o.error, pg)
                attempt_rows.append((o.outcome, finished, duration, error, storable.text(o.traceback, pg),
                                     fingerprint(error), j.id, j.epoch, j.attempt))
                if o.outcome == "completed":
                    job_rows.append(("completed", result, None, finished, None, at, j.id))
                    flag = ',"escaped":"result"' if escaped else ""
                    event_rows.append(dict(job_id=j.id, at=now, event="completed", worker=worker,
                                           detail=f'{{"attempt":{j.attempt},"duration_ms":{duration:.3f}{flag}}}'))
                    plan.settlements.append(Settlement(j.id, "done"))
                    plan.completed += 1
                elif o.permanent or j.attempt >= j.max_attempts:
                    job_rows.append(("failed", None, error, finished, None, at, j.id))
                    event_rows += [dict(job_id=j.id, at=now, event="failed", worker=worker,
                                        detail={"attempt": j.attempt, "outcome": o.outcome}),
                                   dict(job_id=j.id, at=now, event="dead", worker=worker, detail=None)]
                    plan.settlements.append(Settlement(j.id, "dead", 0, j.priority))
                    plan.failed += 1
                else:
                    delay = backoff.delay(j.id, j.epoch, j.attempt)
                    job_rows.append(("pending", None, error, None, d.ts(now + timedelta(seconds=delay)), at, j.id))
                    event_rows.append(dict(job_id=j.id, at=now, event="retry_scheduled", worker=worker,
                                           detail={"attempt": j.attempt, "outcome": o.outcome,
                                                   "delay_s": round(delay, 3)}))
                    plan.settlements.append(Settlement(j.id, "retry", int(delay * 1000), j.priority))
                    plan.retried += 1
            d.run(conn, SETTLE_JOB, job_rows)
            d.run(conn, SETTLE_ATTEMPT, attempt_rows)
            self.statements += 2
            if released:
                conn.execute(delete(job_attempts).where(
                    job_attempts.c.job_id == bindparam("b_id"), job_attempts.c.epoch == bindparam("b_epoch"),
                    job_attempts.c.attempt == bindparam("b_attempt")), released)
                conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id")).values(
                    status="pending", attempts=jobs.c.attempts - 1, updated_at=now), released)
                self.statements += 2
            self._insert_events(conn, event_rows)
        return plan

    def _insert_events(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            d = self.driver
            d.run(conn, INSERT_EVENT, [(e["job_id"], d.ts(e["at"]), e["event"], e["worker"],
                                        e["detail"] if e["detail"] is None or isinstance(e["detail"], str)
                                        else _dumps(e["detail"])) for e in rows])
            self.statements += 1

    def record_renewal(self, worker: str, job_ids: Sequence[tuple[int, int]], now: datetime | None = None,
                       wait: float = RENEWAL_EVENT_WAIT_S) -> bool:
        """One ``lease_renewed`` event per (job id, attempt), the first time its lease is renewed.

        The caller is the worker's lease renewer, whose next Redis renewal must
        not wait on the database: while the ledger is locked or slow (another
        writer holding SQLite's lock, a ``LOCK TABLE``, a stalled server) the
        leases of a live worker would expire and its jobs be reclaimed as lost.
        So the rows go to a writer thread; this waits up to ``wait`` seconds
        for their commit (the usual case: written when it returns) and never
        when an earlier write is still pending.  Returns whether the rows are
        committed.  A write that fails is logged and dropped: the event is
        "at most once" per attempt.  :meth:`close` flushes what is pending.
        """
        if not job_ids:
            return True
        now = now or utcnow()
        rows = [dict(job_id=j, at=now, event="lease_renewed", worker=worker, detail={"attempt": a})
                for j, a in job_ids]
        return self._event_writer().submit(rows, wait)

    def _event_writer(self) -> "_EventWriter":
        with self._writer_lock:
            if self._writer is None:
                self._writer = _EventWriter(self)
            return self._writer

    # ------------------------------------------------------------------ DLQ
    def replay(self, queue: str, job_ids: Sequence[int], now: datetime | None = None) -> list[tuple[int, int]]:
        """Failed -> pending with a fresh attempt budget; returns (id, priority) of each.

        Refuses the whole call (nothing changed) if any id is missing or not failed.
        A compare-and-set on (status, epoch): the rows are locked as read
        (PostgreSQL; SQLite's writer holds the whole database), and the update
        must change every one of them, so a concurrent purge, replay or burst
        either waits for this replay or makes it refuse; never both succeed.
        """
        now = now or utcnow()
        ids = list(dict.fromkeys(int(i) for i in job_ids))
        if not ids:
            return []
        try:
            with self._write(durable=True) as conn:
                query = select(jobs.c.id, jobs.c.status, jobs.c.priority, jobs.c.epoch).where(
                    jobs.c.id.in_(ids), jobs.c.queue == queue)
                if self.dialect == "postgresql":
                    query = query.order_by(jobs.c.id).with_for_update()
                rows = {r.id: r for r in conn.execute(query)}
                for job_id in ids:
                    if job_id not in rows:
                        raise NotFound(f"no job {job_id} in queue {queue!r}")
                    if rows[job_id].status != "failed":
                        raise Conflict(f"job {job_id} is {rows[job_id].status}, not failed: only failed jobs can be replayed")
                changed = conn.execute(update(jobs).where(
                    jobs.c.id == bindparam("b_id"), jobs.c.status == "failed", jobs.c.epoch == bindparam("b_epoch"))
                    .values(status="pending", attempts=0, epoch=jobs.c.epoch + 1, run_at=now, result=None,
                            finished_at=None, updated_at=now),
                    [dict(b_id=i, b_epoch=rows[i].epoch) for i in ids]).rowcount
                if changed != len(ids):  # cannot happen under the locks above; refuse rather than half-replay
                    raise Conflict("a job changed while it was being replayed: nothing was replayed; try again")
                conn.execute(insert(job_events), [dict(job_id=i, at=now, event="replayed", worker=None, detail=None)
                                                  for i in ids])
                self.statements += 3
        except IntegrityError:
            raise Conflict("a replayed job's idempotency key is now held by a newer job") from None
        return [(i, rows[i].priority) for i in ids]

    def purge_dead(self, queue: str, job_ids: Sequence[int | tuple[int, int]] | None = None) -> list[int]:
        """Delete failed jobs (all of the queue's, or the given ids) with their attempts and events.

        ``job_ids`` may pair each id with the replay epoch it was seen failed in:
        a job replayed since (and perhaps failed again) is then left alone.  The
        rows are chosen under lock and the delete re-checks the status (a
        compare-and-set), so a job replayed meanwhile survives, history included;
        only the rows the delete really removed lose their attempts and events.
        Returns those ids.
        """
        with self._write(durable=True) as conn:
            query = select(jobs.c.id, jobs.c.epoch).where(jobs.c.queue == queue, jobs.c.status == "failed")
            if job_ids is None:
                wanted = None
            else:
                wanted = dict(j if isinstance(j, tuple) else (j, None) for j in job_ids)
                query = query.where(jobs.c.id.in_(list(wanted)))
            if self.dialect == "postgresql":
                # lock what is chosen, in id order (as replay does): a replay either committed before
                # (the row is then seen pending and skipped) or waits for this purge to end
                query = query.order_by(jobs.c.id).with_for_update()
            ids = [i for i, epoch in conn.execute(query).all()
                   if wanted is None or wanted[i] is None or wanted[i] == epoch]
            deleted: list[int] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                gone = list(conn.execute(delete(jobs).where(
                    jobs.c.id.in_(chunk), jobs.c.queue == queue, jobs.c.status == "failed")
                    .returning(jobs.c.id)).scalars())
                if gone:
                    conn.execute(delete(job_events).where(job_events.c.job_id.in_(gone)))
                    conn.execute(delete(job_attempts).where(job_attempts.c.job_id.in_(gone)))
                deleted += gone
                self.statements += 3
        return sorted(deleted)

    def add_events(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            with self._write() as conn:
                conn.execute(insert(job_events), list(rows))

    # ------------------------------------------------------------------ worker runs
    def start_run(self, worker: str, queue: str, trigger: str, params: dict[str, Any]) -> int:
        """The id of this burst's ``worker_runs`` row.

        A burst whose ``params`` carry a scheduled run's ``run_id`` continues the
        row its runner created (still unfinished); any other burst gets a new row.
        """
        run_id = params["run_id"][:64] if isinstance(params.get("run_id"), str) and params["run_id"] else None
        with self._write() as conn:
            if run_id is not None:
                row = conn.execute(select(worker_runs.c.id, worker_runs.c.params).where(
                    worker_runs.c.run_id == run_id, worker_runs.c.queue == queue, worker_runs.c.finished_at.is_(None))
                    .order_by(worker_runs.c.id).limit(1).with_for_update()).first()
                if row is not None:
                    conn.execute(update(worker_runs).where(worker_runs.c.id == row.id).values(
                        worker=worker, trigger=trigger, params={**(row.params or {}), **params}, status="running"))
                    return int(row.id)
            return int(conn.execute(insert(worker_runs).values(
                worker=worker, queue=queue, started_at=utcnow(), trigger=trigger, params=params, run_id=run_id,
                status="running").returning(worker_runs.c.id)).scalar_one())

    def finish_run(self, run_id: int, *, processed: int, completed: int, retried: int, failed: int,
                   status: str, error: str | None = None) -> None:
        with self._write() as conn:
            conn.execute(update(worker_runs).where(worker_runs.c.id == run_id).values(
                finished_at=utcnow(), processed=processed, completed=completed, retried=retried, failed=failed,
                status=status, error=storable.text(error, self.driver.pg)))

    def running_runs(self, queue: str) -> list[tuple[int, str, datetime]]:
        """(id, worker, started_at) of the queue's ``worker_runs`` rows still marked ``running``."""
        with self.read_engine.connect() as conn:
            return [(int(r[0]), r[1], r[2]) for r in conn.execute(
                select(worker_runs.c.id, worker_runs.c.worker, worker_runs.c.started_at)
                .where(worker_runs.c.queue == queue, worker_runs.c.status == "running"))]

    def abandon_runs(self, reasons: dict[int, str]) -> int:
        """Close ``running`` rows of dead bursts as ``abandoned`` (id -> error); returns how many changed.

        Compare-and-set on the status: a row its burst closed meanwhile keeps what the burst wrote.
        """
        if not reasons:
            return 0
        now = utcnow()
        changed = 0
        with self._write() as conn:
            for run_id, reason in sorted(reasons.items()):
                changed += conn.execute(update(worker_runs).where(
                    worker_runs.c.id == run_id, worker_runs.c.status == "running").values(
                    finished_at=now, status="abandoned", error=reason)).rowcount
        return changed

    def close(self) -> None:
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


class _EventWriter:
    """A daemon thread writing ``job_events`` rows for callers that must not block on the database.

    Rows submitted while a write is pending are written together, in order,
    in the next transaction.
    """

    def __init__(self, ledger: "Ledger") -> None:
        self.ledger = ledger
        self.pending: queue_mod.Queue[Any] = queue_mod.Queue()
        self.busy = 0  # submitted, not yet written (or dropped)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name="qkit-ledger-events")
        self.thread.start()

    def submit(self, rows: list[dict[str, Any]], wait: float) -> bool:
        done = threading.Event()
        with self.lock:
            idle = self.busy == 0
            self.busy += 1
        self.pending.put((rows, done))
        return done.wait(wait) if idle and wait > 0 else done.is_set()

    def _run(self) -> None:
        while True:
            item = self.pending.get()
            batch = [item]
            while item is not None:
                try:
                    item = self.pending.get_nowait()
                except queue_mod.Empty:
                    break
                batch.append(item)
            work = [b for b in batch if b is not None]
            if work:
                rows = [r for b in work for r in b[0]]
                try:
                    with self.ledger._write() as conn:
                        conn.execute(insert(job_events), rows)
                    self.ledger.statements += 1
                except Exception as exc:  # noqa: BLE001 - an event is at most once; the worker goes on
                    log.warning("could not record %d lease_renewed event(s): %s", len(rows),
                                redact(str(exc)) or type(exc).__name__)
                with self.lock:
                    self.busy -= len(work)
                for _, done in work:
                    done.set()
            if item is None or None in batch:
                return

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (waiting at most ``timeout`` seconds), then stop the thread."""
        self.pending.put(None)
        self.thread.join(timeout)


def _first_line_only(ctx: Any) -> None:
    """Keep a database error's text to its first line, for logs and stored errors.

    The database's DETAIL and CONTEXT lines can quote the data of the failed
    statement (PostgreSQL echoes JSON input up to a bad character, and key
    values on a conflict); the engines already hide the statement's parameters.
    The exception objects, their class and driver codes stay as they were.
    """
    orig = ctx.original_exception
    lines = str(orig).strip().splitlines()
    if len(lines) <= 1:
        return
    try:
        orig.args = (lines[0],)
    except (AttributeError, TypeError):  # pragma: no cover - a driver whose errors refuse new args
        pass
    wrapped = ctx.sqlalchemy_exception
    if wrapped is not None and wrapped.args:
        wrapped.args = (f"({type(orig).__module__}.{type(orig).__name__}) {lines[0]}",)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


#: in-place upgrades: version -> function(connection) bringing the schema to it
MIGRATIONS: dict[int, Any] = {2: _migrate_v2, 3: _migrate_v3, 4: _migrate_worker_run_ids, 5: _migrate_v5}

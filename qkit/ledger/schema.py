"""The ledger's tables, column types, schema version and in-place migrations (docs/architecture.md#the-ledger)."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text,
                        TypeDecorator, and_, bindparam, column, event, func, insert, select, table, text, update)
from sqlalchemy.engine import Connection

from qkit.engine import storable
from qkit.engine.dispatch import redis_now

SCHEMA_VERSION = 7  # v2: job_daily (retention roll-ups, qkit/ops/retention.py); v3: SQLite job ids never reused;
#                   v4: worker_runs.run_id (qkit/runs/runner.py); v5: a failed job keeps its idempotency key;
#                   v6: SQLite's job_events index ix_events_moves for the depth chart (qkit/ledger/analysis.py);
#                   v7: jobs.owner/progress, job_attempts.retry_after_ms, worker_runs.released,
#                       tables schedules and queue_controls
MAX_TEXT = storable.MAX_ERROR_BYTES  # stored error/traceback text is cut to this many bytes (qkit/engine/storable.py)


def utcnow() -> datetime:
    """qkit's clock, an aware UTC datetime: Redis ``TIME`` as this process last saw it
    (:func:`qkit.engine.dispatch.redis_now`), or before any Redis reply this host's wall clock (``time.time``)."""
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

_OWNER_WHERE = "owner IS NOT NULL"  # ix_jobs_owner: a JWT user's own jobs, partial

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
    Column("owner", String(256)),  # v7: the API user (a JWT's ``sub``) who created it; NULL for everyone else
    Column("progress", Float),  # v7: the handler's last progress report, 0..1 (throttled writes)
    Column("progress_note", Text),
    Column("progress_at", UTCDateTime),
    Index("ix_jobs_queue_status", "queue", "status"),
    # v7: a JWT user's own jobs, newest first; partial, so jobs without an owner (most) cost no index entry
    Index("ix_jobs_owner", "queue", "owner", "id", sqlite_where=text(_OWNER_WHERE)),  # PostgreSQL's: below
    # every job holds its key, failed ones too, until purged (docs/semantics.md#idempotency)
    Index("uq_jobs_idempotency", "queue", "idempotency_key", unique=True),
    sqlite_autoincrement=True,  # job ids are never reused (docs/semantics.md#the-promise)
)


@event.listens_for(next(i for i in jobs.indexes if i.name == "ix_jobs_owner"), "before_create")
def _owner_index_on_postgres(index: Index, connection: Connection, **kw: Any) -> None:
    """ix_jobs_owner is partial on PostgreSQL too.  Its option is added only when the index is created
    there: naming a dialect's option loads that dialect (about 15 ms), which a worker on SQLite never needs."""
    if connection.dialect.name == "postgresql":
        index.kwargs["postgresql_where"] = text(_OWNER_WHERE)


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
    Column("retry_after_ms", Float),  # v7: the delay a handler named (qkit.Retry, a 429/503 Retry-After)
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
    Column("released", Integer, nullable=False, server_default="0"),  # v7: claimed, handed back unrun (not retries)
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
    # SQLite only (v6): the depth chart counts each time bin's events from this index alone (no sort, no table
    # row; qkit/ledger/analysis.py); PostgreSQL aggregates by hash and its B-tree entries have a size limit
    Index("ix_events_moves", "event", "at", "detail").ddl_if(dialect="sqlite"),
)

# ---------------------------------------------------------------- workload controls (schema v7)
#: Recurring jobs (``q.schedule``): each fire time of ``cron`` in ``tz`` becomes one job, enqueued by
#: whichever burst or ``qkit tick`` runs first after it; ``next_fire_at`` is the first fire time not yet
#: enqueued (docs/semantics.md#schedules).
schedules = Table(
    "schedules", metadata,
    Column("queue", String(64), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("cron", String(256), nullable=False),
    Column("tz", String(64), nullable=False, default="UTC"),
    Column("type", String(64), nullable=False),
    Column("payload", Json),
    Column("priority", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("catch_up", String(8), nullable=False, default="latest"),  # latest | all | skip
    Column("next_fire_at", UTCDateTime, nullable=False),
    Column("last_fire_at", UTCDateTime),
    Column("last_job_id", BigInteger),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

#: A queue's controls that must outlive a Redis restart: ``kind`` ``pause`` (name ``""``) or ``limit``
#: (name = the job type, value ``{"rate", "per", "concurrency"}``).  Redis holds the working copy the claim
#: script reads; the ledger's copy is the truth a repair restores it from.
queue_controls = Table(
    "queue_controls", metadata,
    Column("queue", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("value", Json),
    Column("updated_at", UTCDateTime, nullable=False),
)


# ---------------------------------------------------------------- retention roll-ups (schema v2)
#: One row per (UTC day of finishing, queue, type) of completed jobs that
#: ``qkit prune`` deleted (qkit/ops/retention.py), so analyses still cover pruned
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


def _migrate_v6(conn: Connection) -> None:
    """v5 -> v6 (SQLite only): index ``job_events`` on (event, at, detail) for the depth chart."""
    if conn.dialect.name == "sqlite":
        next(i for i in job_events.indexes if i.name == "ix_events_moves").create(conn, checkfirst=True)


#: v7's new columns: (table, column, statement on SQLite, statement on PostgreSQL if it differs); constant text
_V7_COLUMNS = (
    ("jobs", "owner", "ALTER TABLE jobs ADD COLUMN owner VARCHAR(256)", None),
    ("jobs", "progress", "ALTER TABLE jobs ADD COLUMN progress FLOAT", None),
    ("jobs", "progress_note", "ALTER TABLE jobs ADD COLUMN progress_note TEXT", None),
    ("jobs", "progress_at", "ALTER TABLE jobs ADD COLUMN progress_at DATETIME",
     "ALTER TABLE jobs ADD COLUMN progress_at TIMESTAMP WITH TIME ZONE"),
    ("job_attempts", "retry_after_ms", "ALTER TABLE job_attempts ADD COLUMN retry_after_ms FLOAT", None),
    ("worker_runs", "released", "ALTER TABLE worker_runs ADD COLUMN released INTEGER NOT NULL DEFAULT 0", None),
)


def _migrate_v7(conn: Connection) -> None:
    """v6 -> v7: the workload controls' columns, tables and index (owner, progress, Retry-After, released,
    schedules, queue controls)."""
    from sqlalchemy import inspect as inspect_db

    on_postgres = conn.dialect.name == "postgresql"
    for table_name, name, sqlite_ddl, postgres_ddl in _V7_COLUMNS:
        if name not in {c["name"] for c in inspect_db(conn).get_columns(table_name)}:
            conn.exec_driver_sql(postgres_ddl if on_postgres and postgres_ddl else sqlite_ddl)
    next(i for i in jobs.indexes if i.name == "ix_jobs_owner").create(conn, checkfirst=True)
    schedules.create(conn, checkfirst=True)
    queue_controls.create(conn, checkfirst=True)


#: in-place upgrades: version -> function(connection) bringing the schema to it
MIGRATIONS: dict[int, Any] = {2: _migrate_v2, 3: _migrate_v3, 4: _migrate_worker_run_ids, 5: _migrate_v5,
                              6: _migrate_v6, 7: _migrate_v7}

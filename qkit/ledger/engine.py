"""Opening the ledger's database: engines, SQLite pragmas and durability, schema set-up, error trimming.

:class:`LedgerBase` is the part of :class:`qkit.ledger.Ledger` every other
ledger module builds on (its engines, transactions and error wording).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, TYPE_CHECKING

from sqlalchemy import Table, create_engine, event, insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, ProgrammingError, SQLAlchemyError

from qkit import extras
from qkit.config import redact
from qkit.errors import BackendUnavailable
from qkit.ledger.schema import MIGRATIONS, SCHEMA_VERSION, metadata, schema_info, utcnow  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from qkit.ledger.events import EventWriter
    from qkit.ledger.driver_sql import DriverSQL

#: the database failed mid-statement (disk full, I/O error, connection lost): the CLI words it in one line
LedgerFailure = OperationalError

_SYNC_PRAGMAS = {"FULL": "PRAGMA synchronous=FULL", "NORMAL": "PRAGMA synchronous=NORMAL"}


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the ledger could not be reached (worth retrying), not that it refused the data."""
    return (isinstance(exc, (BackendUnavailable, OperationalError, InterfaceError, DisconnectionError))
            or bool(getattr(exc, "connection_invalidated", False)))


class LedgerBase:
    """The ledger database, through SQLAlchemy 2 (SQLite in WAL mode, or PostgreSQL)."""

    driver: "DriverSQL"

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            if url.startswith("sqlite"):
                self.engine = self._sqlite_engine(url, immediate=True)
                self.read_engine = self._sqlite_engine(url, immediate=False)
            else:
                # hide_parameters: a failed statement's message never carries job data (payloads,
                # results, keys) into logs or stored errors
                self.engine = create_engine(url, pool_pre_ping=True, json_serializer=dumps, hide_parameters=True)
                self.read_engine = self.engine
        except (SQLAlchemyError, ImportError) as exc:
            missing = extras.explain(exc, "a PostgreSQL ledger") if isinstance(exc, ModuleNotFoundError) else None
            raise missing or BackendUnavailable(f"cannot open the ledger at QKIT_DATABASE_URL={redact(url)}: {exc}") \
                from None
        for engine in {self.engine, self.read_engine}:
            event.listen(engine, "handle_error", _first_line_only)
        self.dialect = self.engine.dialect.name
        #: writes whose commit acknowledges something to a user (replay, purge, a schedule's fire): on SQLite
        #: they commit with synchronous=FULL, so what was acknowledged survives a power loss; an enqueue commits
        #: with NORMAL and calls :meth:`sync` before it returns (docs/semantics.md#the-promise); the worker's own
        #: writes keep NORMAL (a lost outcome is re-run, never lost)
        self.durable_engine = self.engine.execution_options(qkit_durable=True)
        #: SQLite's write-ahead log, which :meth:`sync` flushes to disk (None on PostgreSQL or in memory)
        self.wal_path: str | None = None
        if self.dialect == "sqlite":
            from sqlalchemy.engine import make_url

            database = make_url(url).database
            # absolute now: SQLite opened it from this directory, and the process may change directory later
            self.wal_path = os.path.abspath(f"{database}-wal") if database and database != ":memory:" else None
        self.statements = 0  # SQL statements sent, for cost figures
        self._writer: EventWriter | None = None  # background writer of lease_renewed events
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
                               json_serializer=dumps, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, record: Any) -> None:
            dbapi_conn.isolation_level = None  # qkit emits BEGIN itself, below
            cur = dbapi_conn.cursor()
            # SQLite's default 4 KiB pages: 16 KiB saved ~1.5 us of CPU per job in a burst but cost a single
            # enqueue ~40 us of CPU and ~0.07 ms more (bigger WAL frames to write and fsync; bench/README.md#profiles)
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
            if immediate:
                _begin_immediate(conn)
            else:
                conn.exec_driver_sql("BEGIN")

        return engine

    # ------------------------------------------------------------------ plumbing
    def _write(self, durable: bool = False):
        try:
            return (self.durable_engine if durable else self.engine).begin()
        except OperationalError as exc:
            raise self._unavailable(exc) from None

    def sync(self) -> None:
        """Flush SQLite's write-ahead log to disk: after it, every transaction committed so far survives a
        power loss, as a ``synchronous=FULL`` commit does at its end (SQLite's FULL is this same fsync of
        the log).  An enqueue commits without waiting for the disk, pushes its jobs to Redis, then calls
        this before it returns: the disk's flush and the worker's wake-up overlap, and nothing is
        acknowledged before it is on disk (docs/semantics.md#the-promise).  PostgreSQL's commit is
        durable by itself: nothing to do."""
        if self.wal_path is None:
            return
        try:
            fd = os.open(self.wal_path, os.O_RDONLY)  # opened each time: SQLite may delete and recreate it
        except FileNotFoundError:
            return  # checkpointed and removed by the last connection's close: the database file holds it, synced
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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



#: how long a writer waits for SQLite's write lock (as the connections' busy timeout), and its polling steps:
#: the first, how much each next one grows, the longest
BUSY_WAIT_S, BUSY_STEP_FIRST_S, BUSY_STEP_GROWTH, BUSY_STEP_MAX_S = 60.0, 0.0001, 1.5, 0.001


def _begin_immediate(conn: Connection) -> None:
    """BEGIN IMMEDIATE, waiting for another writer in steps of 0.1 ms growing to 1 ms.

    SQLite's own busy handler sleeps in growing steps of up to 100 ms and does not wake when the lock
    is freed: a worker's claim behind a producer's enqueues waited up to 650 ms for a lock each held
    for a few ms (bench/README.md#latency-latencypy).  Only the wait changes: the transaction, its
    sync level and the order of the writes are as before.  After :data:`BUSY_WAIT_S` the last try
    raises SQLite's own "database is locked", as the busy timeout did.  The steps: an enqueue holds the
    lock for its fsync (0.3-0.5 ms typically); behind one, a writer began after 0.3 ms at the median
    with steps of 0.2 ms doubling to 2 ms, after 0.2 ms with these (a try costs about 2 µs; a 60 s
    wait makes 60,000).
    """
    import sqlite3

    raw = conn.connection.dbapi_connection
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + BUSY_WAIT_S
        step = BUSY_STEP_FIRST_S
        while time.monotonic() < deadline:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY:
                    break  # not a lock held by another writer: the statement below raises it, worded
            time.sleep(step)
            step = min(step * BUSY_STEP_GROWTH, BUSY_STEP_MAX_S)
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # raises (or, the lock just freed, begins)
    finally:
        raw.execute("PRAGMA busy_timeout=60000")


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


#: ``json.dumps`` with these options, without building an encoder per call
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> str:
    return _DUMPS(value)

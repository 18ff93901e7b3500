"""The hot path's statements as driver text, and :class:`DriverSQL`, which sends them straight to the
DB-API cursor in the dialect's parameter style (a batch is one ``executemany`` on SQLite, one statement of
one jsonb array of rows on PostgreSQL).  :mod:`qkit.ledger.hotpath` runs them; docs/architecture.md#the-ledger.
"""
from __future__ import annotations

import json
from collections import namedtuple
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy.engine import Connection

_SCAN = json.JSONDecoder().scan_once

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
        self._last_second: tuple[Any, str] = (None, "")  # (second, minute, hour, day, month, year), its text

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
        if value.tzinfo is timezone.utc:  # qkit's own times (utcnow): their second's text is kept
            second = self._last_second
            key = (value.second, value.minute, value.hour, value.day, value.month, value.year)
            if key != second[0]:  # (a settle writes a finished_at per job, mostly within one second)
                second = self._last_second = (key, value.isoformat(" ", "seconds")[:-6])
            text_ = "%s.%06d" % (second[1], value.microsecond)
        else:
            text_ = value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        self._last_ts = (value, text_)
        return text_

    def run(self, conn: Connection, statement: str, rows: Sequence[tuple]) -> None:
        if not rows:
            return
        if self.pg and len(rows) > 1 and statement in PG_BATCHES:
            # the whole batch as one jsonb parameter, an array of rows that PostgreSQL takes apart:
            # executemany sends a Bind/Execute per row, and psycopg dumps a list parameter element by
            # element in Python; json.dumps is C (bench/README.md#postgresql)
            conn.exec_driver_sql(PG_BATCHES[statement], (json.dumps(rows, default=_iso),))
            return
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
        return self.sql(statement.replace("{ids}", "= ANY(?::bigint[])" if self.pg
                                          else "IN (SELECT value FROM json_each(?))"))

    def ids_arg(self, ids: Sequence[int]) -> Any:
        """The id list as one text parameter: a PostgreSQL array literal, or a JSON array for SQLite."""
        text_ = ",".join(map(str, ids))
        return "{" + text_ + "}" if self.pg else "[" + text_ + "]"

    def json_in(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def payload_in(self, value: Any) -> Any:
        """A stored payload, or None when it is not JSON (a row written behind qkit's back):
        the worker fails that one job as invalid instead of every claim failing."""
        if isinstance(value, str):
            # the compact text qkit writes, through json's own scanner without ``json.loads``'s
            # whitespace checks (a tenth of its cost for a small payload); anything else takes json.loads
            try:
                obj, end = _SCAN(value, 0)
                if end == len(value):
                    return obj
            except (StopIteration, ValueError):
                pass
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
SELECT_FENCE = "SELECT id, status, attempts, epoch FROM jobs WHERE id {ids}"
INSERT_JOB = ("INSERT INTO jobs (id, queue, type, payload, status, priority, attempts, max_attempts, run_at,"
              " created_at, updated_at, epoch, owner) VALUES (?, ?, ?, {json}, 'pending', ?, 0, ?, ?, ?, ?, 0, ?)")
INSERT_EVENT = "INSERT INTO job_events (job_id, at, event, worker, detail) VALUES (?, ?, ?, ?, {json})"
INSERT_ATTEMPT = "INSERT INTO job_attempts (job_id, epoch, attempt, worker, started_at) VALUES (?, ?, ?, ?, ?)"
CLAIM_JOBS = ("UPDATE jobs SET status = 'processing', attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
              " updated_at = ?, progress = NULL, progress_note = NULL, progress_at = NULL WHERE id {ids}")
SETTLE_JOB = ("UPDATE jobs SET status = ?, result = {json}, error = ?, finished_at = ?,"
              " run_at = COALESCE(?, run_at), updated_at = ? WHERE id = ?")
SETTLE_ATTEMPT = ("UPDATE job_attempts SET outcome = ?, finished_at = ?, duration_ms = ?, error = ?, traceback = ?,"
                  " fingerprint = ?, retry_after_ms = ? WHERE job_id = ? AND epoch = ? AND attempt = ?")


def _iso(value: datetime) -> str:
    """json.dumps' fallback for the times in a PostgreSQL batch (the only values JSON has no form for)."""
    return value.isoformat()


def _rows_of(jsonb_columns: str) -> str:
    """``(SELECT ... FROM jsonb_array_elements(%s::jsonb))``: the rows of a batch sent as one jsonb array of
    arrays; ``jsonb_columns`` lists ``name type`` in the order of the statement's ``?`` placeholders."""
    columns = [c.split() for c in jsonb_columns.split(",")]
    picks = ", ".join(f"(e->>{i})::{kind} AS {name}" for i, (name, kind) in enumerate(columns))
    return f"(SELECT {picks} FROM jsonb_array_elements(%s::jsonb) AS e)"


#: PostgreSQL: the same statements for a whole batch in one parameter, rows matched by their ids (the rows of
#: an UPDATE name distinct jobs, or attempts, as they do one by one)
PG_BATCHES = {
    INSERT_JOB: "INSERT INTO jobs (id, queue, type, payload, status, priority, attempts, max_attempts, run_at,"
                " created_at, updated_at, epoch, owner) SELECT v.id, v.queue, v.type, v.payload::jsonb, 'pending',"
                " v.priority, 0, v.max_attempts, v.run_at, v.created_at, v.updated_at, 0, v.owner FROM "
                + _rows_of("id bigint, queue text, type text, payload text, priority int, max_attempts int,"
                           " run_at timestamptz, created_at timestamptz, updated_at timestamptz, owner text") + " AS v",
    INSERT_EVENT: "INSERT INTO job_events (job_id, at, event, worker, detail)"
                  " SELECT v.job_id, v.at, v.event, v.worker, v.detail::jsonb FROM "
                  + _rows_of("job_id bigint, at timestamptz, event text, worker text, detail text") + " AS v",
    INSERT_ATTEMPT: "INSERT INTO job_attempts (job_id, epoch, attempt, worker, started_at) SELECT * FROM "
                    + _rows_of("job_id bigint, epoch int, attempt int, worker text, started_at timestamptz") + " AS v",
    SETTLE_JOB: "UPDATE jobs SET status = v.status, result = v.result::jsonb, error = v.error,"
                " finished_at = v.finished_at, run_at = COALESCE(v.run_at, jobs.run_at), updated_at = v.updated_at"
                " FROM " + _rows_of("status text, result text, error text, finished_at timestamptz,"
                                    " run_at timestamptz, updated_at timestamptz, id bigint") + " AS v"
                " WHERE jobs.id = v.id",
    SETTLE_ATTEMPT: "UPDATE job_attempts SET outcome = v.outcome, finished_at = v.finished_at,"
                    " duration_ms = v.duration_ms, error = v.error, traceback = v.traceback,"
                    " fingerprint = v.fingerprint, retry_after_ms = v.retry_after_ms FROM "
                    + _rows_of("outcome text, finished_at timestamptz, duration_ms float8, error text, traceback text,"
                               " fingerprint text, retry_after_ms float8, job_id bigint, epoch int, attempt int")
                    + " AS v WHERE job_attempts.job_id = v.job_id AND job_attempts.epoch = v.epoch"
                    " AND job_attempts.attempt = v.attempt",
}

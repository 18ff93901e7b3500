"""Admin actions under concurrency, ids, durability and data in error text (issue 12: items 3, 4, 7, 10, 12).

Races are forced, not hoped for: the test holds a row lock or an advisory
lock so the interleaving that lost data happens every time.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import traceback
from datetime import datetime, timezone

import httpx
import pytest
from sqlalchemy import MetaData, create_engine, event, text
from sqlalchemy.exc import DBAPIError

import qkit
from qkit.ops.audit import audit
from qkit.errors import BadInput, NotFound
from qkit.ledger import INSERT_JOB, SCHEMA_VERSION, Ledger, metadata
from qkit.model import NewJob
from qkit.analysis.notebook_helpers import ParameterError, check_params

from conftest import ROOT, wait_for  # noqa: F401  (ROOT: the clone under test)
from services import start_api_server


def _only(setup, *names: str) -> None:
    if setup.name not in names:
        pytest.skip(f"the scenario needs {' or '.join(names)}")


def _dead_jobs(q: qkit.Queue, n: int) -> list[int]:
    """``n`` jobs in the DLQ: a type no worker handles fails at once."""
    ids = q.enqueue_many([{"type": "no_such_type", "payload": {"i": i}, "max_attempts": 1} for i in range(n)])
    q.work()
    assert q.stats()["failed"] == n
    return ids


def _cli(setup, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkit.cli", *args, "--queue", setup.queue, "--json"],
                          env=setup.env(), capture_output=True, text=True, timeout=timeout)


def _lock_waiters(engine, kind: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = :k"),
                            {"k": kind}).scalar()


# ------------------------------------------------------------------ item 3: purge racing replay
def test_purge_racing_replay_keeps_the_acknowledged_replay(setup):
    """`dlq purge` chose every failed job; `dlq replay` of the last one commits while the purge runs.

    The purge is held on the first row it must delete (a row lock taken by
    the test), the replay runs to its end in another process, then the purge
    goes on: the replayed job must stay pending, with its history, in Redis,
    and the audit clean.
    """
    _only(setup, "redis-postgres")
    q = setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 1200)
    first, last = min(ids), max(ids)
    blocker = q.ledger.engine.connect()
    held = blocker.begin()
    blocker.execute(text("SELECT id FROM jobs WHERE id = :i FOR UPDATE"), {"i": first})
    purge = subprocess.Popen([sys.executable, "-m", "qkit.cli", "dlq", "purge", "--yes", "--queue", setup.queue, "--json"],
                             env=setup.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _lock_waiters(q.ledger.engine, "transactionid") or _lock_waiters(q.ledger.engine, "tuple"),
                 timeout=120, what="the purge to wait on the held row")
        replay = _cli(setup, "dlq", "replay", str(last))
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["replayed"] == [last]
    finally:
        held.rollback()
        blocker.close()
    out, err = purge.communicate(timeout=120)
    assert purge.returncode == 0, err
    assert json.loads(out)["purged"] == len(ids) - 1
    job = q.get(last)
    assert (job.status, job.epoch) == ("pending", 1)
    assert "replayed" in [e["event"] for e in q.ledger.events(last)]
    assert q.dispatch.snapshot().place_of(last) == "ready"
    report = audit(q)
    assert report.clean, report.counts
    assert q.stats()["failed"] == 0 and q.stats()["pending"] == 1


def test_concurrent_purge_and_replay_agree_on_every_backend(setup):
    """`dlq purge` and `dlq replay` started together in two processes: whichever wins, a replay
    that answered success left its job pending and in Redis, and one that did not changed nothing."""
    q = setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 600)
    last = max(ids)
    purge = subprocess.Popen([sys.executable, "-m", "qkit.cli", "dlq", "purge", "--yes", "--queue", setup.queue, "--json"],
                             env=setup.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    replay = _cli(setup, "dlq", "replay", str(last))
    out, err = purge.communicate(timeout=120)
    assert purge.returncode == 0, err
    purged = json.loads(out)["purged"]
    if replay.returncode == 0:
        assert json.loads(replay.stdout)["replayed"] == [last] and purged == len(ids) - 1
        assert q.get(last).status == "pending" and q.dispatch.snapshot().place_of(last) == "ready"
    else:
        assert "no job" in replay.stderr and purged == len(ids)
        with pytest.raises(NotFound):
            q.get(last)
    report = audit(q)
    assert report.clean, report.counts


def test_a_repair_between_purge_steps_leaves_no_orphan_dlq_entry(setup):
    """A burst's repair that runs after the purge took the DLQ entries out of Redis but before it
    deleted the rows dead-letters those jobs again; the purge then removes them once more, so no
    Redis entry outlives its ledger row (the soak saw such orphans)."""
    from qkit.ops.reconcile import repair

    q, other = setup.connect(backoff_base=0), setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 5)
    real_purge = q.ledger.purge_dead

    def purge_after_a_repair(queue, chosen):
        assert repair(other)["dead_lettered"] == len(ids)  # the rows are still failed: back in the DLQ
        return real_purge(queue, chosen)

    q.ledger.purge_dead = purge_after_a_repair
    try:
        assert q.purge_dead() == len(ids)
    finally:
        q.ledger.purge_dead = real_purge
    assert q.dispatch.inventory().dead == 0
    report = audit(q)
    assert report.clean, report.counts


def test_a_purge_during_a_repair_leaves_no_orphan_dlq_entry(setup):
    """The other order: a repair read the failed rows, a whole purge ran, then the repair's
    dead-letter push landed.  The repair re-checks what it dead-lettered and takes out the rows
    that are gone."""
    from qkit.ops.reconcile import repair

    q, other = setup.connect(backoff_base=0), setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 5)
    other.dispatch.remove(ids, scope="dead")  # drift: the repair has something to dead-letter
    real_push = other.dispatch.push

    def push_after_a_purge(items, mode):
        if mode == "dead":
            assert q.purge_dead() == len(ids)
        return real_push(items, mode=mode)

    other.dispatch.push = push_after_a_purge
    try:
        done = repair(other)
    finally:
        other.dispatch.push = real_push
    assert done["dead_lettered"] == 0 and q.dispatch.inventory().dead == 0
    report = audit(q)
    assert report.clean, report.counts


@qkit.handler("admin_races_fail")
def _always_fails(payload: dict) -> None:
    raise RuntimeError("this job always fails")


def test_a_purge_before_a_bursts_redis_dead_letter_leaves_no_orphan_entry(setup):
    """A burst records a job `failed` in the ledger and sends its dead-letter to Redis with its next
    claim.  A purge in between deletes the row while Redis still has the job leased; the burst's late
    dead-letter then made a DLQ entry that no row explains (the soak saw such orphans).  The purge
    takes what it deleted out of every place in Redis, so the late dead-letter is fenced."""
    q, other = setup.connect(backoff_base=0), setup.connect(backoff_base=0)
    ids = q.enqueue_many([{"type": "admin_races_fail", "payload": {"i": i}, "max_attempts": 1} for i in range(3)])
    real_settle = q.ledger.settle
    purged: list[int] = []

    def settle_then_purge(*args, **kwargs):
        settled = real_settle(*args, **kwargs)
        if settled.failed:
            purged.append(other.purge_dead())
        return settled

    q.ledger.settle = settle_then_purge
    try:
        q.work()
    finally:
        q.ledger.settle = real_settle
    assert sum(purged) == len(ids)
    assert q.dispatch.inventory().dead == 0
    report = audit(q)
    assert report.clean, report.counts


def test_a_burst_drops_dlq_entries_that_redis_brought_back_after_a_purge(setup):
    """Redis loses its last writes when it restarts (AOF fsync every second) or fails over: a purge's
    removal from the DLQ can come back while the ledger rows stay deleted (the soak saw such
    orphans after a kill -9).  No claim ever reaches a DLQ entry, so the next burst drops the DLQ
    entries that have no ledger row; a DLQ entry whose job has a row is left to the repair."""
    q = setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 4)
    assert q.purge_dead() == 3 + 1
    q.dispatch.push([(j, 0, 0) for j in ids], mode="dead")  # the removal lost, as after a restart
    assert q.dispatch.inventory().dead == len(ids)
    kept = _dead_jobs(q, 2)  # failed jobs with rows: their entries stay
    q.work()
    inv = q.dispatch.inventory()
    assert inv.dead == len(kept) and q.stats()["failed"] == len(kept)
    report = audit(q)
    assert report.clean, report.counts


def test_a_purge_that_loses_redis_after_its_delete_still_returns_what_it_deleted(setup):
    """Redis goes away (a failover, a restart) between the purge's ledger delete and its last removal
    from Redis: the rows are gone, so the purge reports them instead of raising (the soak's purger got
    BackendUnavailable for rows it had deleted); the entries left behind are dropped by the next burst."""
    from qkit.errors import BackendUnavailable

    q = setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 3)
    real_remove = q.dispatch.remove
    calls: list[str] = []

    def remove_then_redis_dies(job_ids, scope="dead"):
        calls.append(scope)
        if len(calls) == 1:
            removed = real_remove(job_ids, scope=scope)
            q.dispatch.push([(j, 0, 0) for j in ids], mode="dead")  # a late dead-letter brings them back
            return removed
        raise BackendUnavailable("cannot reach Redis (the test's outage)")

    q.dispatch.remove = remove_then_redis_dies
    try:
        assert q.purge_dead() == len(ids)
    finally:
        q.dispatch.remove = real_remove
    assert len(calls) == 2 and q.stats()["failed"] == 0
    q.work()
    assert q.dispatch.inventory().dead == 0
    report = audit(q)
    assert report.clean, report.counts


def test_purge_spares_a_job_replayed_since_it_was_chosen(setup):
    """A purge deletes a job only in the replay epoch it saw it failed in: a job replayed (and
    failed again) after the purge read the DLQ stays, with its history."""
    q = setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 3)
    chosen = [(job_id, epoch) for job_id, status, _, _, epoch in q.ledger.active_rows(q.name) if status == "failed"]
    assert q.replay(ids[-1]) == [ids[-1]]
    q.work()  # fails again, now in epoch 1
    assert (q.get(ids[-1]).status, q.get(ids[-1]).epoch) == ("failed", 1)
    assert q.ledger.purge_dead(q.name, chosen) == sorted(ids[:-1])
    assert q.get(ids[-1]).status == "failed"
    assert [e["event"] for e in q.ledger.events(ids[-1])].count("replayed") == 1
    assert len(q.ledger.attempts(ids[-1])) == 2


def test_replay_refuses_a_job_purged_meanwhile(setup):
    """Replay and purge of the same failed job: whichever commits first wins, the other changes nothing."""
    q = setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 2)
    assert q.purge_dead() == 2
    with pytest.raises(NotFound):
        q.replay(ids[0])
    assert q.dispatch.snapshot().place_of(ids[0]) is None
    assert audit(q).clean


# ------------------------------------------------------------------ item 4: idempotency key race
def test_key_released_between_conflict_and_fetch_creates_the_job(setup):
    """The key's holder is purged after the insert saw it and before the fetch looked for it.

    A statement trigger on ``jobs`` makes the enqueue wait (on an advisory
    lock the test holds) right after its conflicting insert; meanwhile a
    burst fails the holder (it keeps its key) and a purge deletes it, which
    frees the key.  The enqueue must then create a new job, not crash.
    """
    _only(setup, "redis-postgres")
    q = setup.connect(backoff_base=0)
    key = "k-" + secrets.token_hex(4)
    holder = q.enqueue("no_such_type", {}, key=key, max_attempts=1)
    lock_id = int.from_bytes(os.urandom(4), "big")
    admin = create_engine(setup.overrides["database_url"])
    trigger = f"qkit_test_pause_{lock_id}"
    with admin.begin() as c:
        c.exec_driver_sql(f"CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                          f"PERFORM pg_advisory_lock({lock_id}); PERFORM pg_advisory_unlock({lock_id}); "
                          f"RETURN NULL; END $$")
        c.exec_driver_sql(f"CREATE TRIGGER {trigger} AFTER INSERT ON jobs FOR EACH STATEMENT "
                          f"EXECUTE FUNCTION {trigger}()")
    locker = admin.connect()
    result: dict = {}

    def enqueue() -> None:
        other = setup.connect(backoff_base=0)
        try:
            result["id"] = other.enqueue("record", {"n": 1}, key=key)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    try:
        locker.exec_driver_sql(f"SELECT pg_advisory_lock({lock_id})")
        thread = threading.Thread(target=enqueue)
        thread.start()
        wait_for(lambda: _lock_waiters(admin, "advisory"), timeout=60, what="the enqueue to pause after its insert")
        q.work()  # the holder fails: it keeps its key ...
        assert q.get(holder).status == "failed"
        assert q.purge_dead() == 1  # ... until it is purged
        locker.exec_driver_sql(f"SELECT pg_advisory_unlock({lock_id})")
        thread.join(60)
    finally:
        locker.close()
        with admin.begin() as c:
            c.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger} ON jobs")
            c.exec_driver_sql(f"DROP FUNCTION IF EXISTS {trigger}()")
        admin.dispose()
    assert "error" not in result, "".join(traceback.format_exception(result["error"]))
    job = q.get(result["id"])
    assert job.id != holder and job.status == "pending" and job.idempotency_key == key
    assert audit(q).clean


# ------------------------------------------------------------------ item 7: ids never reused
def test_ids_are_never_reused_after_the_highest_are_purged(setup):
    q = setup.connect(backoff_base=0)
    ids = _dead_jobs(q, 3)
    assert q.purge_dead() == 3
    plain = q.enqueue("record", {})
    keyed = q.enqueue("record", {}, key="k")
    many = q.enqueue_many([{"type": "record", "payload": {}}] * 2)
    assert plain > max(ids) and keyed > plain and min(many) > keyed


def _v2_ledger(url: str) -> None:
    """A ledger as schema v2 made it: ``jobs.id`` without AUTOINCREMENT, 5 jobs with history."""
    old = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(old)
    old.tables["jobs"].dialect_options["sqlite"]["autoincrement"] = False
    engine = create_engine(url)
    old.create_all(engine)
    now = datetime.now(timezone.utc).replace(tzinfo=None).isoformat(sep=" ")
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO qkit_schema (version) VALUES (2)")
        for i in range(1, 6):
            c.exec_driver_sql("INSERT INTO jobs (id, queue, type, payload, status, priority, attempts, max_attempts,"
                              " idempotency_key, run_at, created_at, updated_at, epoch)"
                              " VALUES (?, 'q', 'record', ?, 'failed', 0, 1, 1, ?, ?, ?, ?, 0)",
                              (i, json.dumps({"i": i}), f"key{i}", now, now, now))
            c.exec_driver_sql("INSERT INTO job_events (job_id, at, event) VALUES (?, ?, 'enqueued')", (i, now))
    engine.dispose()


def test_v2_sqlite_ledger_is_upgraded_in_place_and_stops_reusing_ids(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    _v2_ledger(url)
    ledger = Ledger(url)
    try:
        assert ledger.init_schema() >= 3  # v3 made ids AUTOINCREMENT; later versions keep it
        with ledger.engine.connect() as c:
            ddl = c.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'jobs'").scalar()
            indexes = set(c.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'"
                                            " AND tbl_name = 'jobs'").scalars())
        assert "AUTOINCREMENT" in ddl.upper()
        assert {"ix_jobs_queue_status", "uq_jobs_idempotency"} <= indexes
        assert [ledger.get(i).payload for i in range(1, 6)] == [{"i": i} for i in range(1, 6)]
        assert ledger.purge_dead("q", [4, 5]) == [4, 5]
        new = ledger.insert_jobs("q", [NewJob("record", {}, payload_text="{}")])
        assert new == [(6, True)]
        assert ledger.insert_jobs("q", [NewJob("record", {}, key="key5", payload_text="{}")]) == [(7, True)]
        assert ledger.insert_jobs("q", [NewJob("record", {}, key="key1", payload_text="{}")]) == [(1, False)]
    finally:
        ledger.close()
    again = Ledger(url)  # a second open finds the current version and changes nothing
    try:
        assert again.init_schema() == SCHEMA_VERSION and again.get(6).status == "pending"
    finally:
        again.close()


# ------------------------------------------------------------------ item 12: durability
def test_acknowledging_transactions_commit_with_synchronous_full(setup):
    """Replay and purge commit with synchronous=FULL (2) on SQLite: acknowledged means on disk.  An enqueue
    commits with NORMAL (1) and fsyncs the write-ahead log after its push, before it returns
    (tests/test_enqueue_sync.py watches that order with strace)."""
    _only(setup, "embedded-sqlite", "upstash-sqlite")
    q = setup.connect(backoff_base=0)
    seen: dict[str, set[int]] = {}

    @event.listens_for(q.ledger.engine, "before_cursor_execute")
    def _sync_level(conn, cursor, statement, *_):
        for what, found in (("enqueue", statement.startswith("INSERT INTO jobs")),
                            ("replay", statement.startswith("UPDATE jobs") and "epoch=(jobs.epoch" in statement),
                            ("purge", statement.startswith("DELETE FROM jobs"))):
            if found:
                level = conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]
                seen.setdefault(what, set()).add(level)

    ids = _dead_jobs(q, 2)
    q.enqueue("record", {}, key="durable")
    q.replay(ids[0])
    q.purge_dead()
    assert seen == {"enqueue": {1}, "replay": {2}, "purge": {2}}


# ------------------------------------------------------------------ item 10: data never in error text
SECRET = "s3cr3t-payload-" + secrets.token_hex(4)


def test_nul_in_a_payload_is_refused_alike_on_every_ledger(setup, tmp_path):
    """JSONB cannot hold \\u0000: refused before anything is written, on SQLite too, over HTTP a 4xx."""
    q = setup.connect(backoff_base=0)
    for payload in ({"note": SECRET + "\x00"}, {SECRET + "\x00": 1}, {"deep": [{"x": "\x00"}]}):
        with pytest.raises(BadInput, match="NUL"):
            q.enqueue("record", payload)
    with pytest.raises(BadInput, match="NUL"):
        q.enqueue("record", {}, key="k\x00")
    assert q.enqueue("record", {"text": "a literal \\u0000 is fine"}) > 0
    token = "tok-" + secrets.token_hex(8)
    log = tmp_path / "serve.log"
    server = start_api_server({**setup.env(), "QKIT_API_TOKEN": token, "QKIT_HANDLERS": "job_handlers"}, log,
                              "--queue", setup.queue)
    try:
        r = httpx.post(f"{server.url}/api/jobs", headers={"Authorization": f"Bearer {token}"},
                       content=json.dumps({"type": "record", "payload": {"note": SECRET + "\x00"}}), timeout=30)
    finally:
        server.stop()
    assert 400 <= r.status_code < 500, r.text
    assert "NUL" in r.text and SECRET not in r.text
    assert SECRET not in log.read_text(errors="replace")
    assert q.stats()["total"] == 1


def test_database_errors_carry_no_job_data(setup):
    """A statement that fails says what failed, never with the values it carried (parameters, DETAIL lines)."""
    _only(setup, "embedded-sqlite", "redis-postgres")
    q = setup.connect(backoff_base=0)
    job_id = q.enqueue("record", {})
    payload = json.dumps({"secret": SECRET})
    if q.ledger.dialect == "postgresql":
        payload = payload[:-2] + '\\u0000"}'  # what validation refuses: JSONB rejects it with a CONTEXT line
    now = q.ledger.driver.ts(datetime.now(timezone.utc))
    with pytest.raises(DBAPIError) as caught:
        with q.ledger.engine.begin() as conn:  # the same id again (SQLite), or a NUL (PostgreSQL)
            q.ledger.driver.run(conn, INSERT_JOB, [(job_id if q.ledger.dialect == "sqlite" else job_id + 10_000,
                                                   q.name, "record", payload, 0, 3, now, now, now, None)])
    text_ = "".join(traceback.format_exception(caught.value))
    assert SECRET not in text_
    assert "INSERT INTO jobs" in text_  # the statement is still named


def test_refusing_a_secret_notebook_parameter_never_quotes_it(monkeypatch):
    secret = "sekrit-" + secrets.token_hex(6)
    monkeypatch.setenv("WORKER_SECRET", secret)
    namespace = {"max_jobs": secret, "api_token": "tok-" + secret, "targets": f"https://u:{secret}@example.com/x"}
    with pytest.raises(ParameterError) as caught:
        check_params(namespace, {"max_jobs": int, "api_token": int, "targets": list})
    message = str(caught.value)
    assert secret not in message
    for name in ("max_jobs", "api_token", "targets"):
        assert name in message


OTHER_RESULT = "another-jobs-result-" + secrets.token_hex(4)


@qkit.handler("admin_races_nul_result")
def _nul_result(payload: dict) -> dict:
    return {"r": SECRET + "\x00"} if payload.get("nul") else {"r": OTHER_RESULT}


def test_a_burst_never_stores_or_logs_job_results_in_its_error(setup, caplog):
    """A result PostgreSQL cannot store, batched with others: whatever the burst records or logs about
    it (``worker_runs.error``, log lines) holds no job's result."""
    _only(setup, "redis-postgres", "embedded-sqlite")
    q = setup.connect(backoff_base=0)
    q.enqueue_many([{"type": "admin_races_nul_result", "payload": {"nul": i == 3}, "max_attempts": 1}
                    for i in range(8)])
    try:
        q.work()
    except Exception as exc:  # noqa: BLE001 - a crashed burst is the case under test: its text is checked
        crash = "".join(traceback.format_exception(exc))
        assert SECRET not in crash and OTHER_RESULT not in crash
    with q.ledger.engine.connect() as conn:
        errors = [e for e in conn.execute(text("SELECT error FROM worker_runs WHERE queue = :q"),
                                          {"q": q.name}).scalars() if e]
        job_errors = [e for e in conn.execute(text("SELECT error FROM jobs WHERE queue = :q"),
                                              {"q": q.name}).scalars() if e]
    for stored in errors + job_errors + [caplog.text]:
        assert SECRET not in stored and OTHER_RESULT not in stored

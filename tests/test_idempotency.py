"""Idempotency keys (docs/semantics.md#idempotency): a job holds its key whatever its status, failed
included, until it is purged; the v4 -> v5 upgrade settles keys that older failed jobs shared."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap

import httpx
import pytest
from sqlalchemy import create_engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

import qkit
from qkit.ledger import SCHEMA_VERSION, Ledger, job_events, jobs, metadata, schema_info, utcnow
from qkit.model import NewJob

from conftest import scratch_ledger, wait_for
from services import start_api_server


def count_jobs(q: qkit.Queue) -> int:
    with q.ledger.read_engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(jobs).where(jobs.c.queue == q.name)).scalar()


def events_of(q: qkit.Queue, job_id: int, event: str) -> int:
    with q.ledger.read_engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(job_events).where(
            job_events.c.job_id == job_id, job_events.c.event == event)).scalar()


def cli(setup, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "qkit.cli", *args, "--queue", setup.queue, "--json"],
                          env=setup.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def dead_holder(q: qkit.Queue, key: str) -> int:
    """A job with ``key`` that failed for good (no handler for its type)."""
    holder = q.enqueue("no_such_type", {"n": 1}, key=key)
    assert q.work().failed == 1 and q.get(holder).status == "failed"
    return holder


def test_a_failed_jobs_key_returns_the_failed_job(setup, tmp_path):
    q = setup.connect(backoff_base=0)
    key = "k-" + secrets.token_hex(4)
    holder = dead_holder(q, key)
    assert q.enqueue("record", {"n": 2}, key=key) == holder
    assert q.enqueue_many([{"type": "record", "payload": {}, "key": key}] * 2) == [holder, holder]
    assert cli(setup, "enqueue", "record", "--key", key) == {"id": holder, "duplicate": True}
    token = "tok-" + secrets.token_hex(8)
    server = start_api_server({**setup.env(), "QKIT_API_TOKEN": token}, tmp_path / "serve.log",
                              "--queue", setup.queue)
    try:
        reply = httpx.post(f"{server.url}/api/jobs", headers={"Authorization": f"Bearer {token}"},
                           json={"type": "record", "payload": {}, "key": key}, timeout=60)
    finally:
        server.stop()
    assert reply.status_code == 200 and reply.json() == {"id": holder, "status": "failed", "duplicate": True}
    # nothing was created or changed: one failed job, in Redis's DLQ only; each duplicate recorded
    job = q.get(holder)
    assert count_jobs(q) == 1 and (job.status, job.payload, job.attempts) == ("failed", {"n": 1}, 1)
    snap = q.dispatch.snapshot()
    assert snap.dead == {holder} and snap.ready == set() and snap.delayed == {}
    assert events_of(q, holder, "deduplicated") == 5


def test_replay_keeps_the_key_and_purge_frees_it(setup):
    q = setup.connect(backoff_base=0)
    key = "k-" + secrets.token_hex(4)
    holder = dead_holder(q, key)
    assert cli(setup, "dlq", "replay", str(holder)) == {"replayed": [holder]}
    assert q.enqueue("record", {}, key=key) == holder  # the replayed job is the same row, still holding it
    assert q.get(holder).status == "pending" and q.get(holder).idempotency_key == key
    assert q.work().failed == 1 and q.enqueue("record", {}, key=key) == holder  # failed again: still held
    assert count_jobs(q) == 1
    assert cli(setup, "dlq", "purge", "--yes") == {"purged": 1, "dry_run": False}
    new = q.enqueue("record", {}, key=key)  # purged: the key is free and makes a new job
    assert new > holder and q.get(new).status == "pending" and count_jobs(q) == 1
    assert q.enqueue("record", {}, key=key) == new


def test_concurrent_enqueues_while_the_holder_fails_create_no_second_job(setup, tmp_path):
    """2 processes x 4 threads enqueue one key over and over while a burst fails its holder."""
    q = setup.connect(backoff_base=0)
    key = "k-" + secrets.token_hex(4)
    holder = q.enqueue("no_such_type", {}, key=key)
    flag = tmp_path / "holder-failed"
    code = textwrap.dedent("""
        import json, os, sys, threading, qkit
        q = qkit.connect(sys.argv[1])
        ids, errors = [], []
        def go():
            try:
                after = 0
                while after < 3:  # some enqueues start after the holder failed
                    saw = os.path.exists(sys.argv[3])
                    ids.append(q.enqueue("record", {}, key=sys.argv[2]))
                    after += saw
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=go) for _ in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(json.dumps({"ids": sorted(set(ids)), "errors": errors}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, setup.queue, key, str(flag)], env=setup.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        wait_for(lambda: events_of(q, holder, "deduplicated") >= 8, timeout=120, what="the enqueuers to start")
        assert q.work().failed == 1
        flag.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    seen = [json.loads(o[0]) for o in outs]
    assert seen == [{"ids": [holder], "errors": []}] * 2
    assert count_jobs(q) == 1 and q.get(holder).status == "failed"
    snap = q.dispatch.snapshot()
    assert snap.dead == {holder} and snap.ready == set()


# --------------------------------------------------------------------------- the v4 -> v5 upgrade
#: (queue, key letter, status) per job id 1.., as the old rule (a failed job frees its key) allowed
V4_JOBS = [("q", "a", "failed"), ("q", "a", "failed"), ("q", "a", "pending"),  # 3 holds a
           ("q", "b", "failed"), ("q", "b", "failed"),  # both failed: the newest (5) keeps b
           ("q", "c", "failed"), ("q", "c", "completed"),  # 7 holds c
           ("q", "d", "pending"), ("q", "d", "failed"),  # 8 was replayed after 9 took d and failed: 8 holds d
           ("q", "e", "failed"),  # alone: keeps e
           ("other", "a", "failed"),  # another queue's a
           ("q", None, "failed"), ("q", None, "pending")]
KEPT = {3: "a", 5: "b", 7: "c", 8: "d", 10: "e", 11: "a"}
RELEASED = {1: 3, 2: 3, 4: 5, 6: 7, 9: 8}  # cleared job -> the job that kept its key


def test_v4_ledger_with_shared_keys_is_upgraded_in_place(setup, tmp_path):
    with scratch_ledger(setup, tmp_path, "qkit_v4") as url:
        secret = {letter: f"secret-{letter}-{secrets.token_hex(6)}" for letter in "abcde"}
        engine = create_engine(url)
        now = utcnow()
        with engine.begin() as conn:  # schema v4: the unique index skipped failed jobs
            metadata.create_all(conn)
            conn.exec_driver_sql("DROP INDEX uq_jobs_idempotency")
            conn.exec_driver_sql("CREATE UNIQUE INDEX uq_jobs_idempotency ON jobs (queue, idempotency_key)"
                                 " WHERE status <> 'failed'")
            conn.execute(insert(schema_info).values(version=4))
            for i, (queue, letter, status) in enumerate(V4_JOBS, start=1):
                conn.execute(insert(jobs).values(
                    id=i, queue=queue, type="record", payload={"i": i}, status=status, priority=0, attempts=1,
                    max_attempts=1, idempotency_key=secret.get(letter), run_at=now, created_at=now,
                    updated_at=now, epoch=0))
        ledger = Ledger(url)
        try:
            assert ledger.init_schema() == SCHEMA_VERSION
            with ledger.engine.connect() as conn:
                keys = dict(conn.execute(select(jobs.c.id, jobs.c.idempotency_key)).all())
                repaired = conn.execute(select(job_events.c.job_id, job_events.c.detail)
                                        .where(job_events.c.event == "repaired").order_by(job_events.c.job_id)).all()
                index_sql = conn.exec_driver_sql(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_jobs_idempotency'"
                    if setup.name == "redis-postgres" else
                    "SELECT sql FROM sqlite_master WHERE name = 'uq_jobs_idempotency'").scalar()
            assert keys == {i: secret[KEPT[i]] if i in KEPT else None for i in range(1, len(V4_JOBS) + 1)}
            assert [(j, d["action"]) for j, d in repaired] == [
                (j, f"idempotency key released to job {k} by the v5 upgrade") for j, k in RELEASED.items()]
            assert not any(s in json.dumps([d for _, d in repaired]) for s in secret.values())
            assert "UNIQUE" in index_sql.upper() and "WHERE" not in index_sql.upper()  # every job holds its key
            # the keys now answer as the contract says: a failed holder too; a cleared old job holds nothing
            new = [NewJob("record", {}, key=secret[letter], payload_text="{}") for letter in "abe"]
            assert ledger.insert_jobs("q", new) == [(3, False), (5, False), (10, False)]
            with pytest.raises(IntegrityError), ledger.engine.begin() as conn:
                conn.execute(update(jobs).where(jobs.c.id == 1).values(idempotency_key=secret["a"]))
        finally:
            ledger.close()
        again = Ledger(url)  # a second open finds the current version and changes nothing
        try:
            assert again.init_schema() == SCHEMA_VERSION
            with again.engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(job_events)
                                    .where(job_events.c.event == "repaired")).scalar() == len(RELEASED)
        finally:
            again.close()
        engine.dispose()

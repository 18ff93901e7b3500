"""Retention: ``qkit prune`` deletes old completed jobs in batches and keeps daily roll-ups; the v1 -> v2 upgrade."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, insert, inspect, select, update

import qkit
from conftest import Setup, scratch_ledger
from qkit.ops.audit import audit
from qkit.errors import BadInput, NotFound
from qkit.ledger import (SCHEMA_VERSION, Ledger, job_attempts, job_daily, job_events, jobs, metadata, schema_info,
                         utcnow)
from qkit.ops.retention import bucket, bucket_value, cutoff_for, daily, hist_percentile, parse_age, prune


@qkit.handler("rt_ok", timeout=10)
def rt_ok(payload: dict) -> dict:
    return {"ok": True}


@qkit.handler("rt_flaky", timeout=10)
def rt_flaky(payload: dict) -> dict:
    if qkit.current_job().attempt == 1:
        raise TimeoutError("upstream slow")
    return {"ok": True}


@qkit.handler("rt_fail", timeout=10)
def rt_fail(payload: dict) -> None:
    raise RuntimeError("always")


def backdate(q, ids, when):
    """Move jobs (and their attempts and events) to ``when``, keeping created <= started <= finished."""
    with q.ledger.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id.in_(ids)).values(
            created_at=when - timedelta(seconds=2), run_at=when - timedelta(seconds=2), started_at=when,
            finished_at=when + timedelta(seconds=5), updated_at=when + timedelta(seconds=5)))
        for job_id in ids:
            for a in conn.execute(select(job_attempts.c.id, job_attempts.c.attempt, job_attempts.c.duration_ms)
                                  .where(job_attempts.c.job_id == job_id)).all():
                start = when + timedelta(seconds=a.attempt - 1)
                conn.execute(update(job_attempts).where(job_attempts.c.id == a.id).values(
                    started_at=start, finished_at=start + timedelta(milliseconds=a.duration_ms or 0)))
        conn.execute(update(job_events).where(job_events.c.job_id.in_(ids)).values(at=when))


def rows(q, table, *where):
    with q.ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).where(*where)).mappings()]


def test_prune_keeps_daily_rollups_and_never_the_dlq(setup: Setup):
    q = setup.connect(backoff_base=0)
    old_ok = q.enqueue_many([{"type": "rt_ok", "payload": {"i": i}} for i in range(3)])
    old_flaky = q.enqueue("rt_flaky", {})
    old_dead = q.enqueue("rt_fail", {}, max_attempts=1)
    q.work()
    old_day = (utcnow() - timedelta(days=40)).replace(hour=12, minute=0, second=0, microsecond=0)
    old = [*old_ok, old_flaky]
    backdate(q, [*old, old_dead], old_day)
    recent = q.enqueue("rt_ok", {})
    q.work()
    waiting = q.enqueue("rt_ok", {}, delay=3600)

    dry = prune(q, "30d", dry_run=True)
    assert (dry.jobs, dry.attempts, dry.dry_run) == (4, 5, True) and dry.days == [old_day.strftime("%Y-%m-%d")]
    assert q.get(old_ok[0]).status == "completed"  # a dry run changes nothing

    report = prune(q, "30d", batch_size=3)
    assert (report.jobs, report.attempts, report.batches) == (4, 5, 2)
    assert report.events >= 4 * 3  # enqueued, claimed, completed at least
    assert report.cutoff == cutoff_for(timedelta(days=30))
    for job_id in old:
        with pytest.raises(NotFound):
            q.get(job_id)
        assert not rows(q, job_attempts, job_attempts.c.job_id == job_id)
        assert not rows(q, job_events, job_events.c.job_id == job_id)
    assert q.get(old_dead).status == "failed" and old_dead in {j.id for j in q.dead()}  # the DLQ is never pruned
    assert q.get(recent).status == "completed" and q.get(waiting).status == "pending"

    roll = {r["type"]: r for r in rows(q, job_daily, job_daily.c.queue == q.name)}
    assert set(roll) == {"rt_ok", "rt_flaky"}
    assert {r["day"] for r in roll.values()} == {old_day.strftime("%Y-%m-%d")}
    ok, flaky = roll["rt_ok"], roll["rt_flaky"]
    assert (ok["completed"], ok["attempts"], ok["retried"]) == (3, 3, 0)  # two batches added up
    assert (flaky["completed"], flaky["attempts"], flaky["retried"], flaky["timeout_attempts"]) == (1, 2, 1, 1)
    assert ok["wait_ms_sum"] == pytest.approx(3 * 2000.0)
    assert ok["wait_p50_ms"] == pytest.approx(2000.0, rel=0.03) and sum(ok["histograms"]["exec"].values()) == 3
    assert ok["exec_p95_ms"] is not None

    frame = daily(q)
    past = frame[frame["day"] == old_day.strftime("%Y-%m-%d")].set_index("type")
    today = frame[frame["day"] != old_day.strftime("%Y-%m-%d")]
    assert past.loc["rt_ok", "completed"] == 3 and bool(past.loc["rt_ok", "pruned"])
    assert today["completed"].sum() == 1 and not today["pruned"].any()  # the live rows, same columns
    assert list(daily(q, since=utcnow() - timedelta(days=1))["day"]) == list(today["day"])

    assert prune(q, "30d").jobs == 0  # nothing left to prune: roll-ups are not counted twice
    assert rows(q, job_daily, job_daily.c.queue == q.name, job_daily.c.type == "rt_ok")[0]["completed"] == 3
    assert audit(q).clean


def test_prune_cli_and_ages(setup: Setup, monkeypatch, capsys):
    from qkit.cli import main

    setup.use_in_this_process(monkeypatch)
    q = setup.connect(backoff_base=0)
    job_id = q.enqueue("rt_ok", {})
    q.work()
    backdate(q, [job_id], utcnow() - timedelta(days=3))
    capsys.readouterr()
    assert main(["prune", "--completed-older-than", "7d", "--queue", q.name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == 0
    assert main(["prune", "--completed-older-than", "2d", "--queue", q.name, "--dry-run"]) == 0
    assert "would prune 1 completed job(s)" in capsys.readouterr().out
    assert main(["prune", "--completed-older-than", "48h", "--queue", q.name]) == 0
    assert "pruned 1 completed job(s)" in capsys.readouterr().out
    assert main(["prune", "--completed-older-than", "soon", "--queue", q.name]) == 2
    assert "not like 30d" in capsys.readouterr().err
    assert parse_age("2w") == timedelta(days=14) and parse_age(1.5) == timedelta(days=1.5)
    with pytest.raises(BadInput):
        parse_age("0d")


def test_histogram_percentiles():
    values = [1.0, 2.0, 3.0, 10.0, 100.0, 1000.0, 0.2]
    hist: dict[str, int] = {}
    for v in values:
        hist[str(bucket(v))] = hist.get(str(bucket(v)), 0) + 1
    assert hist_percentile(hist, 0.5) == pytest.approx(3.0, rel=0.03)
    assert hist_percentile(hist, 1.0) == pytest.approx(1000.0, rel=0.03)
    assert bucket_value(bucket(0.2)) == 0.5 and hist_percentile({}, 0.5) is None


def test_v1_ledger_upgrades_in_place(setup: Setup, tmp_path):
    with scratch_ledger(setup, tmp_path, "qkit_v1") as url:
        # a ledger as qkit's schema v1 left it: every table but job_daily, version 1, one old completed job
        engine = create_engine(url)
        old = utcnow() - timedelta(days=60)
        with engine.begin() as conn:
            for table in metadata.sorted_tables:
                if table.name != "job_daily":
                    table.create(conn)
            conn.execute(insert(schema_info).values(version=1))
            job_id = conn.execute(insert(jobs).values(
                queue=setup.queue, type="rt_ok", payload={"v": 1}, status="completed", priority=0, attempts=1,
                max_attempts=3, run_at=old, created_at=old, updated_at=old, started_at=old,
                finished_at=old + timedelta(seconds=1), epoch=0).returning(jobs.c.id)).scalar_one()
            conn.execute(insert(job_attempts).values(job_id=job_id, epoch=0, attempt=1, worker="w-v1",
                                                     started_at=old, finished_at=old + timedelta(seconds=1),
                                                     duration_ms=1000.0, outcome="completed"))
        assert not inspect(engine).has_table("job_daily")
        ledger = Ledger(url)
        assert ledger.init_schema() == SCHEMA_VERSION  # v1 -> v2 -> ... -> the current version in one open
        ledger.close()
        assert inspect(engine).has_table("job_daily")
        with engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalars().all() == [SCHEMA_VERSION]
        q = setup.connect(database_url=url)  # opening a queue upgrades again: a no-op
        assert q.get(job_id).payload == {"v": 1}
        assert prune(q, "30d").jobs == 1
        assert daily(q)["completed"].tolist() == [1]
        q.close()
        setup.opened.remove(q)
        engine.dispose()

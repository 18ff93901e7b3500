"""The depth chart on SQLite counted bin by bin from ix_events_moves (schema v6) equals the one-GROUP-BY count."""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from qkit.analysis import frames
from qkit.ledger import SCHEMA_VERSION, Ledger, analysis, job_events, jobs, schema_info


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    led.init_schema()
    yield led
    led.close()


def _fill(ledger: Ledger, n_jobs: int, seed: int) -> datetime:
    """Jobs of one queue through claims, back-offs, lost leases, failures and replays; times on whole
    milliseconds away from the second's edges (julianday() of the one-GROUP-BY count is millisecond-exact)."""
    rng = random.Random(seed)
    t0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    at = lambda s: t0 + timedelta(seconds=s, milliseconds=rng.randrange(100, 900))  # noqa: E731
    job_rows, ev = [], []
    for i in range(1, n_jobs + 1):
        s = rng.randrange(0, 300)
        job_rows.append(dict(id=i, queue="d", type=rng.choice("xy"), payload={}, status="pending", priority=0,
                             attempts=0, max_attempts=3, run_at=t0, created_at=t0, updated_at=t0, epoch=0))
        ev.append((i, at(s), "enqueued", None))
        for attempt in range(1, rng.randrange(1, 4) + 1):
            s += rng.randrange(1, 20)
            ev.append((i, at(s), "claimed", {"attempt": attempt}))
            s += rng.randrange(0, 30)
            kind = rng.random()
            if kind < 0.4:
                ev.append((i, at(s), "retry_scheduled",
                           {"attempt": attempt, "outcome": "failed", "delay_s": rng.choice([0.0, 2.5, 40.0])}))
            elif kind < 0.5:
                ev.append((i, at(s), "retry_scheduled", {"attempt": attempt, "delay_s": 5.0}))  # a lost lease
            elif kind < 0.6:
                ev.append((i, at(s), "failed", {"attempt": attempt, "outcome": "lost"}))
                ev.append((i, at(s + 1), "replayed", None))
            elif kind < 0.7:
                ev.append((i, at(s), "released", None))
            else:
                ev.append((i, at(s), rng.choice(["completed", "failed"]), {"attempt": attempt, "outcome": "failed"}))
                break
    with ledger.engine.begin() as conn:
        conn.execute(jobs.insert(), job_rows)
        conn.execute(job_events.insert(), [dict(job_id=j, at=t, event=e, worker="w", detail=d) for j, t, e, d in ev])
    return t0


@pytest.mark.parametrize("seed", [1, 2])
def test_depth_by_range_equals_one_group_by(ledger, monkeypatch, seed):
    t0 = _fill(ledger, 400, seed)
    q = SimpleNamespace(name="d", ledger=ledger)
    now = t0 + timedelta(minutes=20)
    windows = [{}, {"freq": "5s"}, {"start": t0 + timedelta(seconds=61), "end": t0 + timedelta(seconds=200),
                                    "freq": "5s"}, {"freq": "10s", "end": t0 + timedelta(seconds=150)}]
    calls = []
    real = analysis._depth_by_range
    monkeypatch.setattr(analysis, "_depth_by_range", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for kw in windows:
        before = len(calls)
        by_range = frames.queue_depth(q, now=now, **kw)
        used = len(calls)
        monkeypatch.setattr(analysis, "_MAX_RANGES", 0)  # more bins than the union takes: one GROUP BY
        grouped = frames.queue_depth(q, now=now, **kw)
        monkeypatch.setattr(analysis, "_MAX_RANGES", 100)
        assert used == before + 1 and len(calls) == used, kw  # the first count went by range, the second did not
        assert len(by_range) > 3 and by_range.to_numpy().sum() > 0
        assert by_range.equals(grouped), kw


def test_v6_adds_the_depth_index_in_place(ledger):
    def indexes() -> set[str]:
        with ledger.engine.connect() as conn:
            return set(conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'index' "
                                         "AND tbl_name = 'job_events'")).scalars())

    assert SCHEMA_VERSION >= 6 and "ix_events_moves" in indexes()
    with ledger.engine.begin() as conn:  # a v5 ledger, as written before
        conn.execute(text("DROP INDEX ix_events_moves"))
        conn.execute(schema_info.update().values(version=5))
    assert "ix_events_moves" not in indexes()
    assert ledger.init_schema() == SCHEMA_VERSION and "ix_events_moves" in indexes()
    with ledger.engine.connect() as conn:
        plan = " ".join(str(r) for r in conn.execute(text(
            "EXPLAIN QUERY PLAN SELECT event, count(*) FROM job_events WHERE event IN ('claimed', 'enqueued') "
            "AND at >= '2025-01-01' AND at < '2025-01-02' GROUP BY event")))
    assert "COVERING INDEX ix_events_moves" in plan and "TEMP B-TREE" not in plan

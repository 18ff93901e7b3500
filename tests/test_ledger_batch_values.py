"""Values that are hard to carry survive the ledger's batch statements unchanged, on every backend x ledger pair.

A batch of jobs goes through the hot path's multi-row statements (SQLite: one ``executemany``;
PostgreSQL: one jsonb array of rows taken apart by the server, ``qkit/ledger/driver_sql.py``):
payloads, results and error messages with quotes, backslashes, JSON-looking text, non-ASCII
and astral characters, big integers and floats must come back as they went in, each on its own job.
"""
from __future__ import annotations

from datetime import timezone

import qkit
from qkit.ledger import job_attempts, job_events

TRICKY = [
    {"s": 'quote " and \' apostrophe', "n": 0},
    {"s": "back\\slash \\u0041 not an escape", "n": 1},
    {"s": '{"looks": ["like", "json"]}', "n": 2},
    {"s": "naïve café — ünïcödé ✓ 🚀 𝔘", "n": 3},
    {"s": "", "n": 4, "big": 2**62 + 7, "neg": -(2**53) - 1, "f": 1.5e-300, "nested": {"a": [1, {"b": None}]}},
    {"s": "{}[],:", "n": 5, "t": True, "none": None},
]


@qkit.handler("batch_echo", timeout=10)
def batch_echo(payload: dict) -> dict:
    if payload["n"] % 2:
        raise ValueError(f"bad {payload['s']}")
    return {"echo": payload, "id": qkit.current_job().id}


def test_tricky_values_round_trip_through_a_batch(q):
    ids = q.enqueue_many([{"type": "batch_echo", "payload": p, "max_attempts": 1} for p in TRICKY])
    summary = q.work()
    assert summary.processed == len(TRICKY)
    for job_id, payload in zip(ids, TRICKY):
        job = q.get(job_id)
        assert job.payload == payload
        assert job.attempts == 1
        assert job.created_at.tzinfo is not None and job.finished_at >= job.started_at >= job.created_at
        if payload["n"] % 2:
            assert job.status == "failed", job
            assert f"bad {payload['s']}" in job.error
        else:
            assert job.status == "completed", job
            assert job.result == {"echo": payload, "id": job_id}
    with q.ledger.read_engine.connect() as conn:
        attempts = conn.execute(job_attempts.select().where(job_attempts.c.job_id.in_(ids))).mappings().all()
        events = conn.execute(job_events.select().where(job_events.c.job_id.in_(ids))).mappings().all()
    assert sorted(a["job_id"] for a in attempts) == sorted(ids)
    for a in attempts:
        assert a["outcome"] in ("completed", "failed") and a["duration_ms"] >= 0
        started = a["started_at"] if a["started_at"].tzinfo else a["started_at"].replace(tzinfo=timezone.utc)
        assert started.tzinfo is not None
    for job_id, payload in zip(ids, TRICKY):
        mine = {e["event"] for e in events if e["job_id"] == job_id}
        assert {"enqueued", "claimed"} <= mine and ("completed" in mine) == (payload["n"] % 2 == 0), mine

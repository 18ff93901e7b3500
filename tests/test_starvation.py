"""Starvation: the per-priority wait view, and priority aging (``QKIT_PRIORITY_AGING_SECONDS``).

With aging A > 0 a job's ready score is ``since_us - priority * A * 10^6``
(``since_us``: when it became due, Redis clock): a job of priority p sorts
like a priority-0 job that became due A*p seconds earlier.  So under a
never-ending flood of priority-5 jobs, a priority-0 job waits for the flood
jobs that arrived less than 5*A seconds after it, and no others.  Without
aging it waits for the whole flood, and ``stats()["starvation"]`` shows it.
"""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

import qkit
from conftest import Setup
from qkit.ops.audit import audit
from qkit.config import settings as resolve_settings
from qkit.errors import ConfigError
from qkit.ledger import job_events, jobs

FLOOD_P, BACKLOG, BURST = 5, 50, 20
order: list[int] = []
floods: dict[str, dict] = {}  # queue name -> {"q": Queue, "on": bool}


@qkit.handler("sv_order", timeout=10)
def sv_order(payload: dict) -> None:
    order.append(qkit.current_job().id)


@qkit.handler("sv_flood", timeout=10)
def sv_flood(payload: dict) -> None:
    """Each flood job that runs enqueues the next one: the high-priority backlog never shrinks."""
    flood = floods[qkit.current_job().queue]
    if flood["on"]:
        flood["q"].enqueue("sv_flood", {}, priority=FLOOD_P)


@qkit.handler("sv_low", timeout=10)
def sv_low(payload: dict) -> None:
    return None


def start_flood(q) -> list[int]:
    floods[q.name] = {"q": q, "on": True}
    return q.enqueue_many([{"type": "sv_flood", "payload": {}, "priority": FLOOD_P} for _ in range(BACKLOG)])


def claim_order(q) -> list[int]:
    """Job ids in the order they were first claimed (events are written in claim order)."""
    with q.ledger.read_engine.connect() as conn:
        rows = conn.execute(select(job_events.c.job_id).select_from(job_events.join(jobs, jobs.c.id == job_events.c.job_id))
                            .where(jobs.c.queue == q.name, job_events.c.event == "claimed")
                            .order_by(job_events.c.id)).scalars().all()
    return list(dict.fromkeys(rows))


def by_priority(q) -> dict[int, dict]:
    return {r["priority"]: r for r in q.stats()["starvation"]["by_priority"]}


def test_without_aging_a_flood_starves_the_low_priority_and_the_view_shows_it(setup: Setup):
    q = setup.connect(backoff_base=0)
    low = q.enqueue("sv_low", {}, priority=0)
    start_flood(q)
    for _ in range(5):
        q.work(max_jobs=BURST)  # each burst claims fewer jobs than the backlog holds
    assert q.get(low).status == "pending" and low not in claim_order(q)
    view = q.stats()["starvation"]
    rows = by_priority(q)
    assert view["aging_s"] == 0.0 and [r["priority"] for r in view["by_priority"]] == [FLOOD_P, 0]
    assert rows[0]["claimed"] == 0 and rows[0]["waiting"] == 1
    assert rows[0]["oldest_waiting_id"] == low and rows[0]["oldest_waiting_s"] > 0
    assert rows[FLOOD_P]["claimed"] == 5 * BURST and rows[FLOOD_P]["waiting"] == BACKLOG
    assert rows[FLOOD_P]["wait_p50_s"] <= rows[FLOOD_P]["wait_p95_s"] <= rows[FLOOD_P]["wait_max_s"]
    assert rows[0]["oldest_waiting_s"] >= rows[FLOOD_P]["oldest_waiting_s"]  # the low job waits longest
    floods[q.name]["on"] = False
    q.work()
    assert claim_order(q)[-1] == low  # it ran only once the flood stopped
    assert audit(q).clean


def test_with_aging_a_low_priority_job_runs_within_the_bound(setup: Setup):
    aging = 0.1
    bound = FLOOD_P * aging  # seconds of arrivals that may overtake the low job
    q = setup.connect(backoff_base=0, priority_aging=aging)
    low = q.enqueue("sv_low", {}, priority=0)
    t_low = time.time()  # the low job's since_us <= this (same host clock as Redis)
    backlog = start_flood(q)
    t_backlog = time.time()
    deadline = time.monotonic() + 60
    while q.get(low).status != "completed":
        assert time.monotonic() < deadline, "the low-priority job starved despite aging"
        q.work(max_jobs=BURST)
    floods[q.name]["on"] = False
    claimed = claim_order(q)
    before = claimed[:claimed.index(low)]
    with q.ledger.read_engine.connect() as conn:
        created = {i: c.timestamp() for i, c in conn.execute(
            select(jobs.c.id, jobs.c.created_at).where(jobs.c.queue == q.name, jobs.c.type == "sv_flood"))}
    # every flood job that overtook it had arrived within the bound; later ones queued behind it
    slack = 0.01
    assert all(created[f] <= t_low + bound + slack for f in before), \
        max(created[f] - t_low for f in before)
    assert any(c > t_low + bound + slack for c in created.values())  # the flood went on past the bound
    if t_backlog - t_low < bound / 2:
        assert set(backlog) <= set(before)  # within the bound, priority still decides
    rows = by_priority(q)
    assert q.stats()["starvation"]["aging_s"] == aging and rows[0]["claimed"] == 1 and rows[0]["waiting"] == 0
    q.work()
    assert audit(q).clean


def test_aging_keeps_priority_then_fifo_order(setup: Setup):
    q = setup.connect(backoff_base=0, priority_aging=3600)  # arrivals seconds apart cannot outweigh a level
    order.clear()
    spec = [0, 5, -3, 5, 0, 10, -3, 5, 0]
    ids = [q.enqueue("sv_order", {}, priority=p) for p in spec]
    batch = q.enqueue_many([{"type": "sv_order", "payload": {}, "priority": i % 3} for i in range(30)])
    q.work()
    prio = dict(zip(ids, spec)) | {j: i % 3 for i, j in enumerate(batch)}
    assert order == sorted(prio, key=lambda j: (-prio[j], j))
    # jobs that become due together (one delayed batch, one due ms) keep FIFO order too
    order.clear()
    delayed = q.enqueue_many([{"type": "sv_order", "payload": {}, "priority": i % 2, "delay": 0.2}
                              for i in range(20)])
    deadline = time.monotonic() + 10
    while q.dispatch.inventory().delayed_due < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    q.work()
    assert order == sorted(delayed, key=lambda j: (-(delayed.index(j) % 2), j))
    assert audit(q).clean


def test_aged_score_formula(setup: Setup):
    aging = 0.25
    q = setup.connect(priority_aging=aging)
    a, b = q.enqueue_many([{"type": "sv_order", "payload": {}, "priority": 0},
                           {"type": "sv_order", "payload": {}, "priority": 2}])
    ready = q.dispatch.keys[0]
    score_a, score_b = (int(float(s)) for s in q.backend.pipeline([["ZSCORE", ready, str(a)], ["ZSCORE", ready, str(b)]]))
    # same script call: since_us of b is since_us of a plus 1 µs; priority 2 is worth 2 * A seconds
    assert score_b - score_a == 1 - round(2 * aging * 1_000_000)
    strict = setup.connect()
    c = strict.enqueue("sv_order", {}, priority=3)
    (score_c,) = strict.backend.pipeline([["ZSCORE", strict.dispatch.keys[0], str(c)]])
    assert int(float(score_c)) == (1_000_000 - 3) * 2 ** 32 + c  # aging off: the strict formula


def test_aging_setting_is_validated(monkeypatch, tmp_path):
    assert resolve_settings(home=tmp_path).priority_aging == 0.0
    monkeypatch.setenv("QKIT_PRIORITY_AGING_SECONDS", "30")
    assert resolve_settings(home=tmp_path).priority_aging == 30.0
    assert resolve_settings(home=tmp_path, priority_aging=2).priority_aging == 2.0  # argument over environment
    for bad in ("-1", "3601", "soon", "nan"):
        monkeypatch.setenv("QKIT_PRIORITY_AGING_SECONDS", bad)
        with pytest.raises(ConfigError, match="QKIT_PRIORITY_AGING_SECONDS"):
            resolve_settings(home=tmp_path)

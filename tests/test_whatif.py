"""qkit.analysis.whatif: retry policies, and recorded failures replayed against them."""
from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

import qkit
from qkit.backends.embedded import EmbeddedServer
from qkit.engine.backoff import Backoff
from qkit.analysis.policies import (DEFAULT_POLICIES, Policy, check_policies, current_policy, parse_policies,
                                    parse_policy)
from qkit.analysis.whatif import MIN_TRIALS, episodes, simulate, simulate_queue, weighted_quantile

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def attempts_frame(jobs: list[dict]) -> pd.DataFrame:
    """An attempts frame like qkit.analysis.frames.attempts from compact job descriptions.

    Each job: id, type, outcomes (list, None = running), and optionally
    max_attempts (3), status (derived), epoch (0), job_epoch (epoch), durations (10 ms each).
    """
    rows = []
    for j in jobs:
        outcomes = j["outcomes"]
        status = j.get("status") or ("completed" if "completed" in outcomes else
                                     "processing" if outcomes and outcomes[-1] is None else
                                     "failed" if len(outcomes) >= j.get("max_attempts", 3) else "pending")
        t = T0
        for n, outcome in enumerate(outcomes, start=1):
            d = (j.get("durations") or [10.0] * len(outcomes))[n - 1]
            rows.append({"job_id": j["id"], "type": j.get("type", "t"), "epoch": j.get("epoch", 0), "attempt": n,
                         "outcome": outcome, "duration_ms": d, "started_at": t,
                         "finished_at": None if outcome is None else t + timedelta(milliseconds=d),
                         "job_status": status, "job_epoch": j.get("job_epoch", j.get("epoch", 0)),
                         "max_attempts": j.get("max_attempts", 3)})
            t += timedelta(seconds=1)
    return pd.DataFrame(rows, columns=["job_id", "type", "epoch", "attempt", "outcome", "duration_ms", "started_at",
                                       "finished_at", "job_status", "job_epoch", "max_attempts"])


F, C = "failed", "completed"


# ---------------------------------------------------------------- policies
@pytest.mark.parametrize("kind,base,cap,expected", [
    ("immediate", 5, 300, [0, 0, 0, 0]),
    ("fixed", 2, 300, [2, 2, 2, 2]),
    ("fixed", 2, 1, [1, 1, 1, 1]),
    ("linear", 2, 5, [2, 4, 5, 5]),
    ("exponential", 1, 5, [1, 2, 4, 5]),
    ("exponential", 0, 5, [0, 0, 0, 0]),
])
def test_deterministic_delays(kind, base, cap, expected):
    p = Policy(kind, base=base, cap=cap)
    assert [p.delay(7, 0, n) for n in range(1, 5)] == expected


def test_full_jitter_is_qkits_own_backoff():
    p = Policy("full_jitter", base=2, cap=30)
    b = Backoff(2, 30)
    for job_id in (1, 2, 99):
        for epoch in (0, 1):
            for n in range(1, 8):
                assert p.delay(job_id, epoch, n) == pytest.approx(b.delay(job_id, epoch, n))


def test_jittered_delays_stay_in_their_envelopes():
    eq = Policy("equal_jitter", base=1, cap=20)
    dec = Policy("decorrelated", base=1, cap=20)
    for job_id in range(1, 60):
        previous = 0.0
        for n in range(1, 8):
            c = eq.ceiling(n)
            assert c / 2 <= eq.delay(job_id, 0, n) <= c
            d = dec.delay(job_id, 0, n, previous)
            assert 1 <= d <= min(20, 3 * (previous if n > 1 else 1)) + 1e-9
            previous = d
    # the same inputs give the same delay: a replay is reproducible
    assert dec.delay(5, 0, 3, 2.0) == dec.delay(5, 0, 3, 2.0)


@pytest.mark.parametrize("text,kind,base,cap,max_attempts", [
    ("exponential 1s..30s x5", "exponential", 1, 30, 5),
    ("fixed 2s x3", "fixed", 2, 300, 3),
    ("fixed 250ms x2", "fixed", 0.25, 300, 2),
    ("immediate x3", "immediate", 1, 300, 3),
    ("full_jitter 0.5s..10s", "full_jitter", 0.5, 10, None),
    ("exponential(base=1, cap=60, max_attempts=5)", "exponential", 1, 60, 5),
    ("linear(2, 10, 4)", "linear", 2, 10, 4),
    ("decorrelated(base=1, max=6)", "decorrelated", 1, 300, 6),
])
def test_parse_policy_text(text, kind, base, cap, max_attempts):
    p = parse_policy(text)
    assert (p.kind, p.base, p.cap, p.max_attempts, p.name) == (kind, base, cap, max_attempts, text)
    again = parse_policy(p.describe())  # describe() is valid input
    assert (again.kind, again.base, again.cap, again.max_attempts) == (kind, base, cap, max_attempts)


def test_parse_current_and_dicts():
    cur = current_policy(0.5, 60)
    p = parse_policy("current", cur)
    assert (p.kind, p.base, p.cap, p.max_attempts, p.name) == ("full_jitter", 0.5, 60, None, "current")
    assert parse_policy("current x5", cur).max_attempts == 5
    assert parse_policy({"kind": "fixed", "base": 3, "max": 2}) == Policy("fixed", base=3, max_attempts=2)
    assert parse_policy({"kind": "current", "max_attempts": 4}, cur).max_attempts == 4


@pytest.mark.parametrize("bad", ["sideways 1s", "fixed banana", "fixed 1s 2s", "fixed 1s x0", "fixed(base=-1)",
                                 "exponential(foo=1)", "fixed(1, 2, 3, 4)", "", 42, {"base": 1},
                                 "fixed(base='1')"])
def test_parse_policy_refuses(bad):
    with pytest.raises(ValueError):
        parse_policy(bad)


def test_policy_lists():
    assert len(parse_policies(DEFAULT_POLICIES, current_policy(2, 300))) == len(DEFAULT_POLICIES)
    check_policies(DEFAULT_POLICIES)
    with pytest.raises(ValueError, match="unique"):
        parse_policies(["fixed 1s x3", "fixed 1s x3"])
    with pytest.raises(ValueError):
        parse_policies([])


def test_weighted_quantile():
    assert weighted_quantile([3, 1, 2], [1, 1, 1], 0.5) == 2
    assert weighted_quantile([1, 10], [0.9, 0.1], 0.5) == 1
    assert weighted_quantile([1, 10], [0.9, 0.1], 0.95) == 10
    assert math.isnan(weighted_quantile([], [], 0.5))
    assert math.isnan(weighted_quantile([1], [0], 0.5))


# ---------------------------------------------------------------- episodes
def test_episodes_keep_finished_ones_only():
    df = attempts_frame([
        {"id": 1, "outcomes": [C]},
        {"id": 2, "outcomes": [F, F, F]},                              # dead after its 3 attempts
        {"id": 3, "outcomes": [F]},                                    # retry pending: in flight
        {"id": 4, "outcomes": [F, None]},                              # running: in flight
        {"id": 5, "outcomes": [F], "status": "failed"},                # permanent (dead after 1 of 3)
        {"id": 6, "outcomes": [F, F, F], "epoch": 0, "job_epoch": 1},  # dead, then replayed
        {"id": 6, "outcomes": [C], "epoch": 1, "status": "completed"},
    ])
    eps, in_flight = episodes(df)
    assert in_flight == 2
    got = {(e.job_id, e.epoch): (e.success_at, e.permanent, e.n) for e in eps}
    assert got == {(1, 0): (1, False, 1), (2, 0): (0, False, 3), (5, 0): (0, True, 1), (6, 0): (0, False, 3),
                   (6, 1): (1, False, 1)}


def test_recorded_row_and_current_policy_reproduce_the_record():
    df = attempts_frame([{"id": 1, "outcomes": [C]}, {"id": 2, "outcomes": [F, C]},
                         {"id": 3, "outcomes": [F, F, F]}, {"id": 4, "outcomes": [F], "status": "failed"}])
    r = simulate(df, ["current"], current=current_policy(2, 300))
    s = r.summary.set_index("policy")
    for name in ("recorded", "current"):
        assert (s.loc[name, "jobs"], s.loc[name, "completed"], s.loc[name, "dlq"], s.loc[name, "attempts"]) == \
            (4, 2, 2, 7), name
    assert s.loc["current", "modelled_jobs"] == 0
    assert s.loc["current", "attempts_vs_recorded"] == 0


def test_fewer_attempts_turn_late_successes_into_dlq():
    df = attempts_frame([{"id": 1, "outcomes": [F, F, C]}, {"id": 2, "outcomes": [F, C]}, {"id": 3, "outcomes": [C]}])
    s = simulate(df, ["immediate x2", "immediate x1"]).summary.set_index("policy")
    assert (s.loc["immediate x2", "completed"], s.loc["immediate x2", "dlq"], s.loc["immediate x2", "attempts"]) == \
        (2, 1, 5)
    assert (s.loc["immediate x1", "completed"], s.loc["immediate x1", "dlq"], s.loc["immediate x1", "attempts"]) == \
        (1, 2, 3)
    assert s.loc["immediate x1", "extra_attempts"] == 0


def test_time_to_success_is_durations_plus_delays():
    df = attempts_frame([{"id": 1, "outcomes": [F, F, C], "durations": [100.0, 200.0, 300.0]}])
    r = simulate(df, ["fixed 2s x3", "exponential 1s..30s x3", "immediate x3"])
    tts = r.outcomes.set_index("policy")["tts_s"]
    assert tts["fixed 2s x3"] == pytest.approx(0.6 + 2 + 2)
    assert tts["exponential 1s..30s x3"] == pytest.approx(0.6 + 1 + 2)
    assert tts["immediate x3"] == pytest.approx(0.6)
    assert r.summary.set_index("policy").loc["fixed 2s x3", "tts_p50_s"] == pytest.approx(4.6)


def test_unrecorded_attempts_use_observed_success_rates():
    # type t: attempt 1 completes 5/10, attempt 2 completes 3/5; two jobs dead after 2 attempts (max 2)
    jobs = [{"id": i, "outcomes": [C], "max_attempts": 2} for i in range(1, 6)]
    jobs += [{"id": i, "outcomes": [F, C], "max_attempts": 2} for i in range(6, 9)]
    jobs += [{"id": i, "outcomes": [F, F], "max_attempts": 2} for i in range(9, 11)]
    df = attempts_frame(jobs)
    r = simulate(df, ["immediate x3", "immediate x2"])
    s = r.summary.set_index("policy")
    # attempt 3 was never made: its rate falls back to the type's retries, 3/5 (>= MIN_TRIALS attempts)
    assert MIN_TRIALS <= 5
    assert s.loc["immediate x3", "completed"] == pytest.approx(8 + 2 * 0.6)
    assert s.loc["immediate x3", "dlq"] == pytest.approx(2 * 0.4)
    assert s.loc["immediate x3", "attempts"] == pytest.approx(5 + 3 * 2 + 2 * 3)
    assert s.loc["immediate x3", "modelled_jobs"] == 2
    assert (s.loc["immediate x2", "completed"], s.loc["immediate x2", "dlq"]) == (8, 2)
    pessimistic = simulate(df, ["immediate x3"], assume="fail").summary.set_index("policy")
    assert (pessimistic.loc["immediate x3", "completed"], pessimistic.loc["immediate x3", "dlq"]) == (8, 2)
    rates = r.rates.set_index(["type", "attempt"])
    assert rates.loc[("t", 1), "success_rate"] == 0.5 and rates.loc[("t", 2), "success_rate"] == 0.6


def test_permanent_failures_are_never_retried():
    df = attempts_frame([{"id": 1, "outcomes": [F], "status": "failed"}])
    s = simulate(df, ["immediate x10"]).summary.set_index("policy")
    assert (s.loc["immediate x10", "dlq"], s.loc["immediate x10", "attempts"]) == (1, 1)


def test_by_type_and_empty_input():
    df = attempts_frame([{"id": 1, "type": "a", "outcomes": [C]}, {"id": 2, "type": "b", "outcomes": [F, F, F]}])
    r = simulate(df, ["current"], current=current_policy(1, 10))
    assert set(r.by_type["type"]) == {"a", "b"}
    assert r.by_type.set_index(["policy", "type"]).loc[("current", "b"), "dlq"] == 1
    empty = simulate(attempts_frame([]), DEFAULT_POLICIES, current=current_policy(1, 10))
    assert (empty.summary["jobs"] == 0).all() and len(empty.summary) == len(DEFAULT_POLICIES) + 1
    with pytest.raises(ValueError, match="assume"):
        simulate(df, ["current"], assume="maybe")


# ---------------------------------------------------------------- against a real ledger
@pytest.fixture
def queue(tmp_path):
    home = tmp_path / "home"
    q = qkit.connect(queue="whatif", home=home, backoff_base=0.01, backoff_max=1)
    yield q
    q.close()
    EmbeddedServer(home).stop()


def drain(q, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        q.work()
        counts = q.ledger.status_counts(q.name)
        if counts["pending"] + counts["processing"] == 0:
            return
        assert time.monotonic() < deadline, counts
        time.sleep(0.02)


def test_simulate_queue_on_a_real_ledger(queue):
    q = queue
    q.enqueue_many([{"type": "web_scraping", "payload": {"simulate": {"fail_rate": 0.5}}} for _ in range(40)])
    drain(q)
    from qkit.analysis import frames

    r = simulate_queue(q, ["current", "immediate x1"])
    s = r.summary.set_index("policy")
    counts = q.ledger.status_counts(q.name)
    att = frames.attempts(q)
    for name in ("recorded", "current"):
        assert s.loc[name, "completed"] == counts["completed"]
        assert s.loc[name, "dlq"] == counts["failed"]
        assert s.loc[name, "attempts"] == len(att)
    first_try = int(((att["attempt"] == 1) & (att["outcome"] == "completed")).sum())
    assert s.loc["immediate x1", "completed"] == first_try
    # "current" draws the very delays the worker recorded
    pol = r.policies[0]
    ev = frames.events(q)
    retries = ev[ev["event"] == "retry_scheduled"]
    assert len(retries) > 0
    for row in retries.itertuples():
        assert pol.delay(row.job_id, 0, row.detail["attempt"]) == pytest.approx(row.detail["delay_s"], abs=1e-3)

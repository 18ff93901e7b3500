"""The job life-cycle's one decision (qkit/engine/lifecycle.py), without servers."""
from __future__ import annotations

import pytest

from qkit.engine.backoff import Backoff
from qkit.engine.lifecycle import Decision, Settlement, decide, lost_error, resend

POLICY = Backoff(base=2.0, cap=300.0)


def verdict(outcome: str, attempt: int, max_attempts: int = 3, backoff: Backoff = POLICY, **kw) -> Decision:
    return decide(outcome, job_id=41, epoch=0, attempt=attempt, max_attempts=max_attempts, backoff=backoff, **kw)


def test_completed_is_done_whatever_the_attempts():
    for attempt in (1, 3, 9):
        v = verdict("completed", attempt)
        assert (v.status, v.action, v.reason) == ("completed", "done", "completed")
        assert v.settlement(41, 7) == Settlement(41, "done", 0, 0)


@pytest.mark.parametrize("outcome", ["failed", "timeout", "lost"])
def test_attempts_left_retry_after_the_backoff(outcome):
    v = verdict(outcome, attempt=1, max_attempts=3)
    assert (v.status, v.action, v.reason) == ("pending", "retry", "retry")
    assert v.delay == POLICY.delay(41, 0, 1) and 0 <= v.delay <= 2.0
    assert v.settlement(41, 7) == Settlement(41, "retry", int(v.delay * 1000), 7)
    assert not v.dead


@pytest.mark.parametrize("outcome", ["failed", "timeout", "lost"])
def test_no_attempts_left_dead_letters(outcome):
    for attempt in (3, 4):  # the last attempt, and one past it (a lost attempt counted twice)
        v = verdict(outcome, attempt=attempt, max_attempts=3)
        assert (v.status, v.action, v.reason, v.delay) == ("failed", "dead", "exhausted", 0.0)
        assert v.dead and v.settlement(41, 7) == Settlement(41, "dead", 0, 7)


def test_permanent_failure_dead_letters_with_attempts_left():
    v = verdict("failed", attempt=1, max_attempts=10, permanent=True)
    assert (v.status, v.action, v.reason) == ("failed", "dead", "permanent")


def test_one_attempt_budget_never_retries():
    assert verdict("timeout", attempt=1, max_attempts=1).dead


def test_released_does_not_count_and_is_due_at_once():
    v = verdict("released", attempt=3, max_attempts=3)
    assert (v.status, v.action, v.reason, v.delay) == ("pending", "retry", "released", 0.0)


def test_base_zero_retries_at_once():
    v = verdict("failed", attempt=2, max_attempts=5, backoff=Backoff(base=0.0, cap=300.0))
    assert (v.action, v.delay) == ("retry", 0.0)
    assert v.settlement(41, 0).delay_ms == 0


def test_cap_bounds_the_delay_of_late_attempts():
    capped = Backoff(base=2.0, cap=5.0)
    delays = [decide("failed", job_id=j, epoch=0, attempt=30, max_attempts=99, backoff=capped).delay
              for j in range(200)]
    assert all(0 <= d <= 5.0 for d in delays) and max(delays) > 4.0


def test_unknown_outcome_is_refused():
    with pytest.raises(ValueError, match="unknown outcome 'cancelled'"):
        verdict("cancelled", attempt=1)


def test_resend_matches_what_the_ledger_holds():
    assert resend(5, "failed", 3) == Settlement(5, "dead", 0, 3)
    assert resend(5, "completed", 3) == Settlement(5, "done", 0, 3)
    assert resend(5, None, 3) == Settlement(5, "done", 0, 0)
    assert resend(5, "pending", 3) == Settlement(5, "retry", 0, 3)


def test_lost_error_names_the_holder():
    assert lost_error("w-1") == "lost: worker w-1 stopped renewing its lease (process died or stalled)"

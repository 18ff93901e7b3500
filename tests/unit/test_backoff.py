"""Retry back-off (qkit/engine/backoff.py), without servers."""
from __future__ import annotations

from qkit.engine.backoff import Backoff, unit_hash


def test_ceiling_doubles_from_base_up_to_the_cap():
    b = Backoff(base=2.0, cap=30.0)
    assert [b.ceiling(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_base_zero_means_no_delay():
    b = Backoff(base=0.0, cap=30.0)
    assert b.ceiling(5) == 0.0 and b.delay(1, 0, 5) == 0.0


def test_huge_attempt_numbers_stay_at_the_cap():
    assert Backoff(base=1.0, cap=60.0).ceiling(10_000) == 60.0


def test_delay_is_deterministic_jittered_and_within_the_ceiling():
    b = Backoff(base=1.0, cap=300.0)
    assert b.delay(7, 0, 3) == b.delay(7, 0, 3)
    assert b.delay(7, 0, 3) != b.delay(7, 1, 3)  # a replay draws new jitter
    delays = [b.delay(j, 0, 3) for j in range(500)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert min(delays) < 0.5 and max(delays) > 3.5  # full jitter: the whole range is used


def test_unit_hash_is_uniform_enough():
    values = [unit_hash("x", i) for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < sum(values) / len(values) < 0.55

"""qkit.engine.dispatch.RedisClock: the ledger's clock, from Redis replies, carried on the monotonic clock."""
from __future__ import annotations

from datetime import timezone

import pytest

from qkit.engine import dispatch
from qkit.engine.dispatch import RedisClock


@pytest.fixture(autouse=True)
def process_clock_kept():
    """A RedisClock passes what it observes on to the process clock (qkit.engine.dispatch.redis_now):
    these made-up replies must not set the ledger's clock of the tests that follow."""
    saved = (dispatch._PROCESS_CLOCK._seen, dispatch._PROCESS_CLOCK._last_ms)
    yield
    dispatch._PROCESS_CLOCK._seen, dispatch._PROCESS_CLOCK._last_ms = saved


def test_no_reply_no_time():
    assert RedisClock().now() is None


def test_now_follows_the_latest_reply():
    clock = RedisClock()
    clock.observe(1_700_000_000_000)
    first = clock.now()
    assert first.tzinfo is timezone.utc
    assert 0 <= first.timestamp() * 1000 - 1_700_000_000_000 < 5_000
    clock.observe(1_700_000_060_000)  # a reply a minute later moves it forward
    assert clock.now().timestamp() * 1000 >= 1_700_000_060_000


def test_a_reply_with_a_longer_transit_never_sets_the_time_back():
    clock = RedisClock()
    clock.observe(1_700_000_000_000)
    before = [clock.now() for _ in range(3)]
    clock.observe(1_700_000_000_000 - 50)  # its TIME was read 50 ms "earlier" than the estimate
    after = clock.now()
    assert before == sorted(before) and after >= before[-1]

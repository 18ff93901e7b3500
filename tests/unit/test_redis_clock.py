"""qkit.engine.dispatch.RedisClock: the ledger's clock, from Redis replies, carried on the monotonic clock."""
from __future__ import annotations

from datetime import timezone

from qkit.engine.dispatch import RedisClock


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

"""Handler-directed outcomes in the pure life-cycle (qkit/engine/lifecycle.py): qkit.Retry, qkit.Permanent,
and the Retry-After header of an httpx.HTTPStatusError 429/503, without servers."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

import qkit
from qkit.engine.backoff import Backoff
from qkit.engine.lifecycle import Directive, decide, directive, parse_retry_after

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
POLICY = Backoff(base=2.0, cap=300.0)


def verdict(attempt: int = 1, max_attempts: int = 3, backoff: Backoff = POLICY, **kw):
    return decide("failed", job_id=41, epoch=0, attempt=attempt, max_attempts=max_attempts, backoff=backoff, **kw)


def status_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx.Response(status, headers=headers or {}, request=request)
    return httpx.HTTPStatusError(f"{status}", request=request, response=response)


def test_exported_from_qkit():
    assert qkit.Retry is not None and qkit.Permanent is not None
    assert issubclass(qkit.Retry, Exception) and issubclass(qkit.Permanent, Exception)


def test_named_delay_replaces_the_backoff_while_attempts_are_left():
    v = verdict(attempt=1, retry_after=2.0)
    assert (v.status, v.action, v.reason, v.delay) == ("pending", "retry", "retry_after", 2.0)
    assert v.settlement(41, 5).delay_ms == 2000
    # not the back-off's delay: the jitter would give something in [0, 2]
    assert verdict(attempt=1, retry_after=0.0).delay == 0.0


def test_named_delay_is_capped_by_the_backoff_max():
    assert verdict(retry_after=10_000.0).delay == 300.0
    assert verdict(retry_after=10_000.0, backoff=Backoff(base=0.0, cap=7.0)).delay == 7.0


def test_named_delay_still_bounded_by_max_attempts():
    v = verdict(attempt=3, max_attempts=3, retry_after=2.0)
    assert (v.status, v.action, v.reason) == ("failed", "dead", "exhausted")


def test_permanent_wins_over_a_named_delay():
    assert verdict(attempt=1, max_attempts=5, permanent=True, retry_after=2.0).reason == "permanent"


def test_retry_and_permanent_directives():
    assert directive(qkit.Retry(after=2.5, reason="quota"), NOW) == Directive(retry_after=2.5)
    assert directive(qkit.Retry(), NOW) == Directive()  # no delay named: the usual back-off
    assert directive(qkit.Permanent("bad prompt"), NOW) == Directive(permanent=True)
    assert directive(RuntimeError("x"), NOW) == Directive()
    assert directive(None, NOW) == Directive()
    assert "retry after 2.5 s: quota" in str(qkit.Retry(after=2.5, reason="quota"))


@pytest.mark.parametrize("after", [-1, float("nan"), float("inf"), True, "2"])
def test_retry_refuses_a_bad_delay(after):
    with pytest.raises(ValueError, match="after must be a number of seconds"):
        qkit.Retry(after=after)


@pytest.mark.parametrize("status", [429, 503])
def test_http_429_503_with_retry_after_seconds(status):
    assert directive(status_error(status, {"Retry-After": "2"}), NOW) == Directive(retry_after=2.0)


def test_http_retry_after_date_counts_from_the_response_date():
    server_now = NOW - timedelta(hours=3)  # the server's clock is far off ours: only its own two dates count
    headers = {"Retry-After": format_datetime(server_now + timedelta(seconds=30), usegmt=True),
               "Date": format_datetime(server_now, usegmt=True)}
    assert directive(status_error(429, headers), NOW).retry_after == pytest.approx(30.0)


def test_http_retry_after_date_without_date_header_counts_from_now():
    headers = {"Retry-After": format_datetime(NOW + timedelta(seconds=90), usegmt=True)}
    assert directive(status_error(503, headers), NOW).retry_after == pytest.approx(90.0)
    past = {"Retry-After": format_datetime(NOW - timedelta(seconds=90), usegmt=True)}
    assert directive(status_error(503, past), NOW).retry_after == 0.0


@pytest.mark.parametrize("status,headers", [(500, {"Retry-After": "2"}), (429, {}), (503, {"Retry-After": "soon"}),
                                            (404, {"Retry-After": "2"}), (429, {"Retry-After": "-3"})])
def test_other_http_errors_take_the_backoff(status, headers):
    assert directive(status_error(status, headers), NOW) == Directive()


@pytest.mark.parametrize("value,expected", [("0", 0.0), (" 120 ", 120.0), ("1.5", 1.5), ("", None), (None, None),
                                            ("1e9", None), ("Wed, 21 Oct 2015 07:28:00", 0.0)])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, NOW) == expected

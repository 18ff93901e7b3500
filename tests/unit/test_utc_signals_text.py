"""qkit.utc.as_utc, qkit.engine.signals.StopSignals and qkit.text.clip without servers."""
from __future__ import annotations

import os
import signal
import threading
from datetime import date, datetime, timedelta, timezone

import pytest

from qkit.engine.signals import StopSignals
from qkit.utc import as_utc

UTC = timezone.utc


@pytest.mark.parametrize("value, expected", [
    ("2025-01-31T12:00:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    (" 2025-01-31T13:00:00+01:00 ", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    ("2025-01-31 12:00:00.000001", datetime(2025, 1, 31, 12, 0, 0, 1, tzinfo=UTC)),  # SQLite's text
    ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),
    (date(2025, 1, 31), datetime(2025, 1, 31, tzinfo=UTC)),
    (datetime(2025, 1, 31, 12), datetime(2025, 1, 31, 12, tzinfo=UTC)),
    (datetime(2025, 1, 31, 14, tzinfo=timezone(timedelta(hours=2))), datetime(2025, 1, 31, 12, tzinfo=UTC)),
    (None, None), ("", None), ("  ", None),
])
def test_as_utc(value, expected):
    got = as_utc(value)
    assert got == expected and (got is None or got.tzinfo == UTC)


def test_as_utc_takes_pandas_timestamps():
    pd = pytest.importorskip("pandas")
    assert as_utc(pd.Timestamp("2025-01-31T12:00:00")) == datetime(2025, 1, 31, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match="is not a date or time"):
        as_utc(pd.NaT)


@pytest.mark.parametrize("value", ["last tuesday", "2025-13-01", 12345])
def test_as_utc_refuses_what_is_not_a_time(value):
    with pytest.raises(ValueError, match="is not"):
        as_utc(value)


def test_stop_signals_route_to_the_callback_and_restore():
    seen: list[int] = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    guard = StopSignals(seen.append).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGTERM, signal.SIGINT]
    finally:
        guard.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    guard.restore()  # idempotent


def test_stop_signals_do_nothing_off_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    guards: list[StopSignals] = []
    t = threading.Thread(target=lambda: guards.append(StopSignals(lambda _s: None).install()))
    t.start()
    t.join()
    assert guards[0].previous == {} and signal.getsignal(signal.SIGTERM) == before


def test_clip():
    from qkit.text import clip

    assert clip("abcdef", 6) == "abcdef" and clip("abcdefg", 6) == "abcde…" and len(clip("x" * 500, 300)) == 300
    assert clip("a\n  b\tc", 10, one_line=True) == "a b c" and clip("a\nb", 10) == "a\nb"
    assert clip(12345, 3) == "12…"


def test_duration_in_words():
    from qkit.text import duration

    assert [duration(s) for s in (0, 0.000034, 0.0042, 0.0099996, 0.5, 4.25, 15, 180, 5400, 7200 * 2, 86400 * 3)] == [
        "0 ms", "0.034 ms", "4.2 ms", "10 ms", "500 ms", "4.2 s", "15 s", "3 min", "90 min", "4.0 h", "3.0 days"]
    assert duration(-15) == "15 s"  # explain says "in 15 s" or "15 s ago" around it

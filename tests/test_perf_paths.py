"""The hot path's shortcuts (bench/README.md#profiles) keep what the long way did."""
from __future__ import annotations

import time
from collections import OrderedDict

import pytest

import qkit
from qkit.errors import BadInput
from qkit.model import check_payload


@qkit.handler("perf_quick", timeout=300)
def perf_quick(payload: dict) -> None:
    time.sleep(0.3)  # long enough for the watcher to see it running and sleep towards its deadline


@pytest.mark.parametrize("setup", ["embedded-sqlite"], indirect=True)
def test_a_short_timeout_after_a_long_one_is_kept(setup, tmp_path):
    """The watcher of a serial batch is woken only by a deadline sooner than the one it sleeps towards:
    a handler with a 0.5 s timeout after one with 300 s is still abandoned at 0.5 s."""
    import job_handlers  # noqa: F401 - registers "hang" (timeout 0.5 s)

    q = setup.connect(backoff_base=0)
    quick = q.enqueue("perf_quick", {}, priority=5)  # runs first: the watcher then sleeps towards +300 s
    hung = q.enqueue("hang", {"log": str(tmp_path / "log")}, max_attempts=1)
    t0 = time.monotonic()
    summary = q.work()
    assert time.monotonic() - t0 < 60, "the short timeout waited for the long one"
    assert q.get(quick).status == "completed"
    assert q.get(hung).status == "failed" and "timeout" in q.get(hung).error
    assert summary.completed == 1 and summary.failed == 1


@pytest.mark.parametrize("payload", [
    {"a": 1, "b": "x", "c": None, "d": True, "e": 1.5},  # flat: the shortcut
    OrderedDict(a=1),  # a Mapping that is not a dict: the long way
    {"a": [1, {"b": 2}], "c": {"d": (1, 2)}},
])
def test_payload_text_alike_either_way(payload):
    import json

    assert check_payload(payload) == json.dumps(dict(payload), separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("payload, message", [
    ({1: "a", "1": "b"}, "twice"),  # a non-text key: the collision check still runs
    ({"a": float("nan")}, "not JSON-serialisable"),
    ({"a": "\u0000"}, "NUL"),
    ({"a": "\ud800"}, "not valid Unicode"),
    ({"a": 10 ** 5000}, "not JSON-serialisable"),
])
def test_flat_payloads_still_refused(payload, message):
    with pytest.raises(BadInput, match=message):
        check_payload(payload)


def test_a_sqlite_writer_begins_soon_after_the_lock_is_freed(tmp_path):
    """A ledger write waiting for another connection's write lock begins within a few ms of its release.
    SQLite's own busy handler would still be asleep (steps of up to 100 ms; ~90 ms after a 0.34 s hold)."""
    import sqlite3
    import threading

    from qkit.ledger import Ledger

    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(f"sqlite:///{path}")
    ledger.init_schema()
    lags = []
    for _ in range(3):
        holding, released = threading.Event(), []

        def hold() -> None:
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            holding.set()
            time.sleep(0.34)
            other.execute("COMMIT")
            released.append(time.monotonic())
            other.close()

        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait(10)
        with ledger._write() as conn:
            begun = time.monotonic()
            conn.exec_driver_sql("SELECT 1")
        holder.join()
        lags.append(begun - released[0])
    ledger.engine.dispose()
    assert min(lags) < 0.04, f"began {min(lags) * 1000:.0f} ms after the lock was freed"

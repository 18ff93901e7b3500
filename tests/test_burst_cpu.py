"""The CPU cuts of the burst and enqueue paths keep behaviour: the collector held and handed back,
payloads and times read and written as before, the claim's rare paths (retries not due, lost attempts)."""
from __future__ import annotations

import gc
import json
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

import pytest

from qkit.engine import gcpause
from qkit.ledger.driver_sql import DriverSQL


class Cycle:
    def __init__(self) -> None:
        self.me = self


def _collected(make) -> bool:
    """Whether a reference cycle made by ``make`` before a collection is freed by it."""
    import weakref

    ref = weakref.ref(make())
    gc.collect()
    return ref() is None


def test_hold_keeps_old_garbage_until_the_last_holder_releases():
    assert gc.get_freeze_count() == 0
    old = Cycle()
    ref = __import__("weakref").ref(old)
    del old  # garbage now, but it existed when the first loop started
    gcpause.hold()
    try:
        gcpause.hold()  # a second loop (another burst of the process) starts while the first runs
        gcpause.release()
        gc.collect()
        assert ref() is not None, "the first holder still holds: what existed before it is not collected"
        assert gc.get_freeze_count() > 0
        assert _collected(Cycle), "garbage made while held is collected as usual"
    finally:
        gcpause.release()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None, "handed back at the last release: the old cycle is collected"


def test_paused_turns_the_collector_off_until_the_last_overlapping_loop_ends():
    assert gc.isenabled()
    inside, leave = threading.Barrier(3), threading.Event()

    def loop() -> None:
        with gcpause.paused():
            inside.wait(10)
            leave.wait(10)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(10)
    assert not gc.isenabled()
    with gcpause.paused():  # a third, nested in time: ends first, the others still run
        pass
    assert not gc.isenabled()
    leave.set()
    for t in threads:
        t.join(10)
    assert gc.isenabled()


def test_paused_ends_when_the_block_raises_and_leaves_a_disabled_collector_off():
    with pytest.raises(RuntimeError):
        with gcpause.paused():
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()  # the application turned it off itself
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_paused_leaves_a_frozen_heap_frozen():
    gc.freeze()  # a pre-fork server froze its heap (Python's advice): an enqueue must not undo that
    try:
        before = gc.get_freeze_count()
        with gcpause.paused():
            pass
        # unfrozen would be 0; a few frozen objects may be freed meanwhile (other tests' threads)
        assert gc.get_freeze_count() > before // 2 > 0
    finally:
        gc.unfreeze()


class Watching(Mapping):
    """A payload that notes whether the collector is on each time enqueue_many reads it."""

    seen: list[bool] = []

    def __init__(self, **items) -> None:
        self._items = items

    def __getitem__(self, key):
        Watching.seen.append(gc.isenabled())
        return self._items[key]

    def __iter__(self):
        Watching.seen.append(gc.isenabled())
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def test_enqueue_many_pauses_the_collector_while_it_builds_and_writes_the_batch(embedded_home, tmp_path):
    import qkit
    from qkit.errors import BadInput

    with qkit.connect("gcq", home=embedded_home, database_url=f"sqlite:///{tmp_path / 'l.sqlite3'}") as q:
        Watching.seen = []
        ids = q.enqueue_many([{"type": "t", "payload": Watching(n=i)} for i in range(3)])
        assert Watching.seen and not any(Watching.seen), "items were read with the collector on"
        assert gc.isenabled()
        assert [q.get(i).payload for i in ids] == [{"n": 0}, {"n": 1}, {"n": 2}]
        Watching.seen = []
        with pytest.raises(BadInput):  # refused on its second item: the collector is back on all the same
            q.enqueue_many([{"type": "t", "payload": Watching(n=1)}, {"type": "t", "payload": 1}])
        assert Watching.seen and not any(Watching.seen) and gc.isenabled()


@pytest.mark.parametrize("text, expected", [
    ('{}', {}),
    ('{"a":1,"b":[1,2,{"c":null}],"d":"é\\u00e9"}', {"a": 1, "b": [1, 2, {"c": None}], "d": "éé"}),
    (' {"a": 1} ', {"a": 1}),  # written by hand, with spaces: json.loads reads it
    ('{"a":1}  \n', {"a": 1}),
    ('{"a":NaN}', {"a": float("nan")}),
])
def test_payload_in_reads_what_json_loads_reads(text, expected):
    got = DriverSQL("sqlite").payload_in(text)
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert json.dumps(got, sort_keys=True) == json.dumps(json.loads(text), sort_keys=True)


@pytest.mark.parametrize("text", ['{"a":1}{"b":2}', '{"a":1} x', '{"a":', "not json", "", '{"a":1,}'])
def test_payload_in_refuses_what_json_loads_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    assert DriverSQL("sqlite").payload_in(text) is None


def test_payload_in_gives_each_row_its_own_object():
    d = DriverSQL("sqlite")
    a, b = d.payload_in('{"x":[]}'), d.payload_in('{"x":[]}')
    a["x"].append(1)
    assert b == {"x": []}


@pytest.mark.parametrize("value", [
    datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=timezone.utc),
    datetime(2026, 1, 2, 3, 4, 5, 0, tzinfo=timezone.utc),  # no microseconds: still written with six digits
    datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=timezone(timedelta(hours=-5))),
    datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc),
])
def test_ts_writes_sqlalchemy_text_of_the_utc_time(value):
    text = DriverSQL("sqlite").ts(value)
    utc = value.astimezone(timezone.utc).replace(tzinfo=None)
    assert text == utc.isoformat(sep=" ", timespec="microseconds")
    assert datetime.fromisoformat(text) == utc

def test_ts_of_times_in_sequence_across_seconds_days_and_years():
    d = DriverSQL("sqlite")
    start = datetime(2026, 12, 31, 23, 59, 58, 999990, tzinfo=timezone.utc)
    steps = [timedelta(microseconds=3), timedelta(milliseconds=700), timedelta(seconds=60), timedelta(days=1),
             timedelta(days=-400), timedelta(0), timedelta(microseconds=-5)]
    value = start
    for i in range(200):
        value = value + steps[i % len(steps)]
        fresh = datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                         value.microsecond, tzinfo=timezone.utc)  # a new object: not the one-value cache
        assert d.ts(fresh) == value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"), value


def test_a_lazy_context_is_built_once_on_the_first_ask_from_any_thread():
    from qkit.engine.handlers import JobContext, LazyContext, current_job, run_in_context

    made: list[object] = []

    def reporter_of(job):
        made.append(job)
        return lambda fraction, note: None

    lazy = LazyContext(7, "t", 2, 5, "q", "w-1", reporter_of, "the job", frozenset({7}))
    assert made == []  # nothing built until a handler asks
    seen: list[JobContext | None] = []

    def handler(payload):
        threads = [threading.Thread(target=lambda: seen.append(lazy.get())) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return current_job(), current_job()

    first, second = run_in_context(lazy, handler, {})
    assert first is second and all(s is first for s in seen) and made == ["the job"]
    assert (first.id, first.type, first.attempt, first.max_attempts, first.queue, first.worker) == (
        7, "t", 2, 5, "q", "w-1")
    assert first.cancel_requested
    assert current_job() is None  # outside the handler again
    plain = JobContext(1, "t", 1, 3, "q", "w")
    assert run_in_context(plain, lambda p: current_job(), {}) is plain


def test_a_second_holder_does_not_freeze_the_garbage_made_under_the_first():
    import weakref

    gcpause.hold()  # a --forever burst: it holds for the life of the process
    try:
        made = Cycle()
        ref = weakref.ref(made)
        del made  # garbage made while the burst runs
        gcpause.hold()  # a second burst of the same process (qkit serve)
        gcpause.release()
        gc.collect()
        assert ref() is None, "the enqueue's hold froze the burst's garbage: it would never be collected"
    finally:
        gcpause.release()
    assert gc.get_freeze_count() == 0


def test_hold_leaves_a_heap_the_application_froze_frozen():
    gc.freeze()  # a pre-fork server froze its heap before it forked this worker
    try:
        before = gc.get_freeze_count()
        gcpause.hold()
        gcpause.release()
        # unfrozen would be 0; a few frozen objects may be freed meanwhile (other tests' threads)
        assert gc.get_freeze_count() > before // 2 > 0, "the burst unfroze the application's heap"
    finally:
        gc.unfreeze()
    gcpause.hold()  # nothing frozen before: the burst freezes, and unfreezes at its end
    assert gc.get_freeze_count() > 0
    gcpause.release()
    assert gc.get_freeze_count() == 0

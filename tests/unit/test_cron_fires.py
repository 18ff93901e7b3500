"""Which fire times a tick enqueues (qkit/engine/cron.py), with a made-up "now" and no servers.

A simulated schedule is ticked at chosen instants: across fire times, across the daylight-saving changes
of Europe/Berlin and America/New_York, and across gaps with no tick.  The expected fire times are written
out from the calendar (UTC instants of the local wall times), not computed by croniter.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from qkit.engine import cron
from qkit.engine.cron import MAX_CATCH_UP, SCAN_LIMIT, due, job_key, next_after
from qkit.errors import BadInput

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class Sim:
    """A schedule's state as the ledger keeps it (next_fire_at), moved by ticks at given instants."""

    def __init__(self, expr: str, tz: str, created: datetime, catch_up: str = "latest") -> None:
        self.expr, self.tz, self.catch_up = expr, tz, catch_up
        self.next = next_after(expr, tz, created)
        self.jobs: list[datetime] = []  # one per enqueued fire time
        self.skipped: list[int | None] = []

    def tick(self, now: datetime) -> tuple[datetime, ...]:
        d = due(self.expr, self.tz, self.next, now, self.catch_up)
        assert d.next_fire_at > now and all(f <= now for f in d.fires)
        assert list(d.fires) == sorted(set(d.fires))
        self.jobs += d.fires
        self.skipped.append(d.skipped)
        self.next = d.next_fire_at
        return d.fires

    def tick_every(self, start: datetime, end: datetime, step: timedelta) -> None:
        t = start
        while t < end:
            self.tick(t)
            t += step
        self.tick(end)


def test_every_fire_time_yields_one_job_when_ticks_come_more_often_than_fires():
    s = Sim("*/15 * * * *", "UTC", at("2027-01-05 09:58:00"))
    s.tick_every(at("2027-01-05 09:59:00"), at("2027-01-05 12:01:00"), timedelta(minutes=4))
    assert s.jobs == [at("2027-01-05 10:00:00") + timedelta(minutes=15 * i) for i in range(9)]
    assert set(s.skipped) == {0}


def test_a_tick_exactly_at_the_fire_time_enqueues_it_and_a_tick_just_before_does_not():
    s = Sim("0 * * * *", "UTC", at("2027-01-05 09:30:00"))
    assert s.tick(at("2027-01-05 09:59:59.999")) == ()
    assert s.tick(at("2027-01-05 10:00:00")) == (at("2027-01-05 10:00:00"),)
    assert s.tick(at("2027-01-05 10:00:00.5")) == ()  # the same fire time never twice
    assert s.next == at("2027-01-05 11:00:00")


def test_seconds_field_fires_every_second():
    s = Sim("* * * * * *", "UTC", at("2027-01-05 10:00:00.2"))
    s.tick_every(at("2027-01-05 10:00:00.7"), at("2027-01-05 10:00:05.7"), timedelta(milliseconds=500))
    assert s.jobs == [at("2027-01-05 10:00:01") + timedelta(seconds=i) for i in range(5)]


# ----------------------------------------------------------------------------- gaps and catch_up
GAP_START, GAP_NOW = at("2027-01-05 10:00:00"), at("2027-01-05 10:47:10")
GAP_FIRES = [at("2027-01-05 10:05:00") + timedelta(minutes=5 * i) for i in range(9)]  # 10:05 .. 10:45


def gapped(catch_up: str) -> Sim:
    s = Sim("*/5 * * * *", "UTC", GAP_START, catch_up)
    assert s.tick(GAP_START + timedelta(seconds=30)) == ()
    return s


def test_gap_latest_enqueues_one_job_for_the_latest_missed_fire():
    s = gapped("latest")
    assert s.tick(GAP_NOW) == (GAP_FIRES[-1],)
    assert s.skipped[-1] == len(GAP_FIRES) - 1
    assert s.next == at("2027-01-05 10:50:00")
    assert s.tick(at("2027-01-05 10:50:01")) == (at("2027-01-05 10:50:00"),)  # back on time


def test_gap_all_enqueues_one_job_per_missed_fire():
    s = gapped("all")
    assert s.tick(GAP_NOW) == tuple(GAP_FIRES)
    assert s.skipped[-1] == 0 and s.next == at("2027-01-05 10:50:00")


def test_gap_skip_enqueues_none_of_the_missed_fires_and_jumps_past_now():
    s = gapped("skip")
    assert s.tick(GAP_NOW) == ()
    assert s.skipped[-1] == len(GAP_FIRES) and s.next == at("2027-01-05 10:50:00")
    # on time again: one fire passed since the last tick, so it is enqueued
    assert s.tick(at("2027-01-05 10:52:00")) == (at("2027-01-05 10:50:00"),)


def test_all_is_bounded_to_the_latest_fires():
    s = Sim("* * * * *", "UTC", at("2027-01-05 10:00:30"), "all")
    fires = s.tick(at("2027-01-05 14:10:30"))  # 250 fire times passed (10:01 .. 14:10)
    assert len(fires) == MAX_CATCH_UP
    assert fires[0] == at("2027-01-05 12:31:00") and fires[-1] == at("2027-01-05 14:10:00")
    assert s.skipped[-1] == 250 - MAX_CATCH_UP


@pytest.mark.parametrize("catch_up, n_fires", [("latest", 1), ("all", MAX_CATCH_UP), ("skip", 0)])
def test_a_gap_longer_than_the_scan_jumps_to_its_end(catch_up, n_fires):
    s = Sim("* * * * *", "UTC", at("2027-01-05 10:00:30"), catch_up)
    now = at("2027-02-05 10:00:30")  # a month of minutes: far more than SCAN_LIMIT fire times
    assert (now - at("2027-01-05 10:00:30")) / timedelta(minutes=1) > SCAN_LIMIT
    fires = s.tick(now)
    assert fires == tuple(at("2027-02-05 10:00:00") - timedelta(minutes=n_fires - 1 - i) for i in range(n_fires))
    assert s.skipped[-1] is None and s.next == at("2027-02-05 10:01:00")


# ----------------------------------------------------------------------------- daylight saving
BERLIN_DAILY_0230 = [  # 02:30 local; on 2027-03-28 02:30 does not exist (fires at 03:00 CEST); on 2027-10-31 twice
    "2027-03-26 01:30", "2027-03-27 01:30", "2027-03-28 01:00", "2027-03-29 00:30", "2027-03-30 00:30"]
BERLIN_FALL_0230 = ["2027-10-29 00:30", "2027-10-30 00:30", "2027-10-31 00:30", "2027-10-31 01:30",
                    "2027-11-01 01:30", "2027-11-02 01:30"]


@pytest.mark.parametrize("catch_up", ["latest", "all", "skip"])
@pytest.mark.parametrize("start, end, expected", [
    ("2027-03-25 12:00", "2027-03-30 12:00", BERLIN_DAILY_0230),
    ("2027-10-28 12:00", "2027-11-02 12:00", BERLIN_FALL_0230),
])
def test_berlin_daily_across_dst_ticked_every_20_minutes(catch_up, start, end, expected):
    s = Sim("30 2 * * *", "Europe/Berlin", at(start), catch_up)
    s.tick_every(at(start), at(end), timedelta(minutes=20))
    assert s.jobs == [at(x) for x in expected]
    assert len({job_key("daily", f) for f in s.jobs}) == len(s.jobs)  # the two 02:30s have their own keys


@pytest.mark.parametrize("start, end", [("2027-03-13 20:00", "2027-03-15 04:00"),   # spring forward 03-14
                                        ("2027-11-06 20:00", "2027-11-08 04:00")])  # fall back 11-07
def test_new_york_hourly_fires_once_per_utc_hour_across_dst(start, end):
    s = Sim("0 * * * *", "America/New_York", at(start))
    s.tick_every(at(start) + timedelta(minutes=1), at(end), timedelta(minutes=7))
    hours = int((at(end) - at(start)) / timedelta(hours=1))
    assert s.jobs == [at(start) + timedelta(hours=1 + i) for i in range(hours)]


def test_new_york_spring_forward_gap_fires_once_at_the_first_instant_after_it():
    s = Sim("30 2 * * *", "America/New_York", at("2027-03-12 12:00"), "all")
    s.tick(at("2027-03-16 12:00"))  # a gap with no tick across the change: one job per fire time
    # 02:30 EST = 07:30Z; on 03-14 02:30 does not exist: 03:00 EDT = 07:00Z; then 02:30 EDT = 06:30Z
    assert s.jobs == [at("2027-03-13 07:30"), at("2027-03-14 07:00"), at("2027-03-15 06:30"), at("2027-03-16 06:30")]


def test_fall_back_gap_with_catch_up_all_enqueues_both_repeated_times_once():
    s = Sim("30 1 * * *", "America/New_York", at("2027-11-05 12:00"), "all")
    assert s.tick(at("2027-11-05 12:01")) == ()
    s.tick(at("2027-11-08 12:00"))
    # 01:30 EDT = 05:30Z; on 11-07 01:30 happens twice: 05:30Z (EDT) and 06:30Z (EST); then 01:30 EST = 06:30Z
    assert s.jobs == [at("2027-11-06 05:30"), at("2027-11-07 05:30"), at("2027-11-07 06:30"), at("2027-11-08 06:30")]
    s.tick(at("2027-11-08 12:00"))  # a tick at the same now again adds nothing
    assert len(s.jobs) == 4


# ----------------------------------------------------------------------------- any tick sequence
@settings(max_examples=150, deadline=None)
@given(gaps=st.lists(st.integers(min_value=1, max_value=95 * 60), min_size=1, max_size=40),
       catch_up=st.sampled_from(["latest", "all", "skip"]))
def test_any_tick_sequence_enqueues_each_fire_at_most_once_under_the_catch_up_rule(gaps, catch_up):
    created = at("2027-10-30 20:00")
    s = Sim("*/10 * * * *", "Europe/London", created, catch_up)  # London falls back on 2027-10-31
    fires_all, now = [], created
    for g in gaps:
        prev_next, now = s.next, now + timedelta(seconds=g)
        passed = []
        t = prev_next
        while t <= now:  # every 10 minutes in UTC too: London's offsets are whole hours
            passed.append(t)
            t += timedelta(minutes=10)
        got = s.tick(now)
        expected = {"latest": passed[-1:], "all": passed[-MAX_CATCH_UP:], "skip": passed if len(passed) == 1 else []}
        assert list(got) == expected[catch_up]
        fires_all += passed
    assert len(s.jobs) == len(set(s.jobs))
    assert set(s.jobs) <= set(fires_all)
    if catch_up == "all" and max(gaps) < MAX_CATCH_UP * 600:
        assert s.jobs == fires_all  # nothing dropped: every fire time has its one job


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("expr", ["61 * * * *", "* * *", "hello", "", "   ", None, 5, "x" * 300])
def test_bad_cron_is_refused_in_one_line(expr):
    with pytest.raises(BadInput) as e:
        cron.check_cron(expr)
    assert "\n" not in str(e.value) and "cron" in str(e.value)


@pytest.mark.parametrize("tz", ["Mars/Base", "../../etc/passwd", "", None, "Europe/Berlin\x00"])
def test_bad_time_zone_is_refused_in_one_line(tz):
    with pytest.raises(BadInput) as e:
        cron.check_tz(tz)
    assert "\n" not in str(e.value)


def test_bad_catch_up_and_an_expression_that_never_fires_are_refused():
    with pytest.raises(BadInput, match="catch_up"):
        due("* * * * *", "UTC", at("2027-01-01 00:00"), at("2027-01-01 00:05"), "sometimes")
    with pytest.raises(BadInput, match="no fire time"):
        next_after("0 0 30 2 *", "UTC", at("2027-01-01 00:00"))
    assert cron.check_cron("  */5   *  * * * ") == "*/5 * * * *"


def test_a_stored_definition_this_installation_cannot_read_is_bad_input_not_a_crash():
    """A tick skips such a schedule with one logged line (qkit.engine.schedules): it must be BadInput."""
    with pytest.raises(BadInput, match="tzdata"):
        due("* * * * *", "Gone/Zone", at("2027-01-01 00:00"), at("2027-01-01 00:05"), "latest")
    with pytest.raises(BadInput, match="cron expression"):
        due("99 * * * *", "UTC", at("2027-01-01 00:00"), at("2027-01-01 00:05"), "latest")

"""Limits per type, the pure part (qkit/engine/limits.py): what a valid limit is, its claim-script form,
and the measures the limits tests and the starvation view use to show a limit was kept."""
from __future__ import annotations

import math

import pytest

from qkit.engine.limits import Limit, check_limit, check_type, peak_overlap, peak_starts
from qkit.errors import BadInput


def test_a_limit_in_the_scripts_form_and_back():
    lim = check_limit(50, 1, 3)
    assert lim == Limit(50, 1.0, 3) and lim.spec() == "50 1000 3"
    assert Limit.from_value(lim.to_value()) == lim
    assert check_limit(None, 60.0, 2).spec() == "0 60000 2"  # no rate: 0
    assert check_limit(7, 0.0015, None).spec() == "7 2 0"  # per rounds to whole ms, at least 1
    assert check_limit(5.0, 2, None).rate == 5  # a whole float is a whole number
    assert check_limit(10, 30, None).describe() == "10 per 30 s"


@pytest.mark.parametrize("rate, per, concurrency, message", [
    (0, 1, None, "rate must be 1..1000000"),
    (1_000_001, 1, None, "rate must be 1..1000000"),
    (True, 1, None, "rate must be a whole number"),
    ("5", 1, None, "rate must be a whole number"),
    (5, 0.0001, None, "per must be 0.001..86400"),
    (5, 86_401, None, "per must be 0.001..86400"),
    (5, math.inf, None, "per must be a number"),
    (5, "1", None, "per must be a number"),
    (None, 60, -1, "concurrency must be 1..100000"),
    (None, 60, None, "needs a rate, a concurrency, or both"),
])
def test_bad_limits_say_what_and_why(rate, per, concurrency, message):
    with pytest.raises(BadInput, match=message):
        check_limit(rate, per, concurrency)


def test_a_stored_value_is_checked_again():
    with pytest.raises(BadInput):
        Limit.from_value({"rate": 0, "per": 1, "concurrency": None})
    with pytest.raises(BadInput):
        Limit.from_value(["not", "an", "object"])


def test_type_names():
    assert check_type("web_scraping") == "web_scraping"
    with pytest.raises(BadInput, match="is invalid"):
        check_type("Web Scraping")


def test_peak_starts_counts_half_open_windows():
    assert peak_starts([], 1.0) == 0
    assert peak_starts([0.0, 0.5, 0.999, 1.0, 1.5], 1.0) == 3  # [0, 1) holds 3; 1.0 starts a new one
    assert peak_starts([0.0] * 4 + [2.0], 1.0) == 4
    assert peak_starts([3.0, 1.0, 2.0, 1.2], 1.0) == 2  # unsorted input


def test_peak_overlap_ends_before_starts_at_one_instant():
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1
    assert peak_overlap([(0, 2), (1, 3), (1.5, 1.6)]) == 3
    assert peak_overlap([(0, math.inf), (5, 6)]) == 2

"""The error fingerprint DLQ triage groups by (qkit/engine/lifecycle.py), without servers."""
from __future__ import annotations

from qkit.engine.lifecycle import fingerprint


def test_empty_errors_have_no_fingerprint():
    assert fingerprint(None) is None and fingerprint("") is None


def test_numbers_ids_and_quoted_values_are_normalised():
    a = fingerprint("ValueError: order 1234 for 'alice' failed after 2.5s (id 3f2a9c01be7d)")
    b = fingerprint("ValueError: order 98 for 'bob' failed after 10s (id deadbeefcafe01)")
    assert a == b == "ValueError: order <n> for '?' failed after <n>s (id <id>)"


def test_hex_ids_and_double_quotes():
    assert fingerprint('KeyError: "user" 0x7f3a9b2c10 at deadbeef') == "KeyError: '?' <id> at <id>"


def test_different_errors_stay_apart_and_only_the_first_line_counts():
    assert fingerprint("TimeoutError: no reply") != fingerprint("ValueError: no reply")
    assert fingerprint("RuntimeError: boom\nTraceback line 1\nline 2") == "RuntimeError: boom"


def test_identifiers_with_digits_are_kept():
    assert fingerprint("NameError: name 'x' is not defined in step2") == "NameError: name '?' is not defined in step2"


def test_long_messages_are_cut_to_200_characters():
    assert len(fingerprint("E: " + "word " * 200)) == 200

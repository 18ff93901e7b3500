"""The error fingerprint DLQ triage groups by (qkit/engine/fingerprints.py), without servers.

Tracebacks come from real exceptions raised by real handler code run through
qkit's own ``run_in_context``, formatted as the worker formats them.
"""
from __future__ import annotations

import importlib.util
import traceback
import uuid

from hypothesis import given, settings, strategies as st

from qkit.engine.fingerprints import MAX_FINGERPRINT, fingerprint, handler_frame, mask
from qkit.engine.handlers import JobContext, run_in_context
from qkit.engine.lifecycle import fingerprint as lifecycle_fingerprint

CTX = JobContext(1, "t", 1, 3, "q", "w-test")


def failure(func, payload: dict | None = None) -> tuple[str, str]:
    """(error, traceback) as the worker stores them (qkit/engine/pool.py outcome_of) for ``func`` raising."""
    try:
        run_in_context(CTX, func, payload or {})
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    raise AssertionError("the handler did not raise")


def load(tmp_path, name: str, source: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- messages (no traceback)
def test_empty_errors_have_no_fingerprint():
    assert fingerprint(None) is None and fingerprint("") is None


def test_the_life_cycle_module_still_exports_it():
    assert lifecycle_fingerprint is fingerprint


def test_numbers_ids_and_quoted_values_are_normalised():
    a = fingerprint("ValueError: order 1234 for 'alice' failed after 2.5s (id 3f2a9c01be7d)")
    b = fingerprint("ValueError: order 98 for 'bob' failed after 10s (id deadbeefcafe01)")
    assert a == b == "ValueError: order <*> for '?' failed after <*>s (id <*>)"


def test_hex_ids_and_double_quotes():
    assert fingerprint('KeyError: "user" 0x7f3a9b2c10 at deadbeef') == "KeyError: '?' <*> at <*>"


def test_id_like_tokens_fall_in_one_group():
    variants = ["RuntimeError: shard x5 of job-123 failed on worker_7 (req 0x1f, -3 left)",
                "RuntimeError: shard x12 of job-9 failed on worker_12 (req 0xffe0, -17 left)",
                f"RuntimeError: shard q1 of {uuid.uuid4()} failed on w-{uuid.uuid4().hex} (req 0x0, 4 left)"]
    assert {fingerprint(v) for v in variants} == {"RuntimeError: shard <*> of <*> failed on <*> (req <*>, <*> left)"}


def test_uuids_in_any_case_are_one_token():
    upper = str(uuid.uuid4()).upper()
    assert fingerprint(f"KeyError: no row {uuid.uuid4()}") == fingerprint(f"KeyError: no row {upper}") \
        == "KeyError: no row <*>"


def test_different_errors_stay_apart_and_only_the_first_line_counts():
    assert fingerprint("TimeoutError: no reply") != fingerprint("ValueError: no reply")
    assert fingerprint("RuntimeError: boom\nTraceback line 1\nline 2") == "RuntimeError: boom"
    assert fingerprint("ValueError: no such user") != fingerprint("ValueError: no such order")


def test_the_exception_type_is_never_masked():
    assert fingerprint("S3UploadError: part 7 of 9") == "S3UploadError: part <*> of <*>"
    assert fingerprint("Http2Error: stream 5") != fingerprint("Http3Error: stream 5")


def test_long_messages_are_cut_to_200_characters():
    assert len(fingerprint("E: " + "word " * 200)) == MAX_FINGERPRINT


# ---------------------------------------------------------------- type and the handler's own frame
def test_with_a_traceback_the_key_is_the_type_and_the_handlers_frame_not_the_message():
    def charge(payload):
        raise ValueError(f"card {payload['card']} declined for {payload['user']}")

    e1, tb1 = failure(charge, {"card": "4242", "user": "alice"})
    e2, tb2 = failure(charge, {"card": "5555", "user": "bob"})
    assert e1 != e2 and mask(e1) != mask(e2)  # the messages differ beyond numbers: only the frame groups them
    fp = fingerprint(e1, tb1)
    assert fp == fingerprint(e2, tb2)
    assert fp.startswith("ValueError at test_fingerprint.py:charge: raise ValueError(")
    assert "alice" not in fp and "4242" not in fp  # no job data in the key


def test_two_raise_sites_in_one_handler_are_two_groups():
    def handler(payload):
        if payload["step"] == 1:
            raise KeyError("first step")
        raise KeyError("second step")

    assert fingerprint(*failure(handler, {"step": 1})) != fingerprint(*failure(handler, {"step": 2}))


def test_a_library_frame_below_the_handler_is_skipped():
    import json

    def parse(payload):
        return json.loads(payload["text"])

    # different depths inside json, different messages: one error of the handler's line
    a = fingerprint(*failure(parse, {"text": "{bad"}))
    b = fingerprint(*failure(parse, {"text": "[1,"}))
    assert a == b == 'JSONDecodeError at test_fingerprint.py:parse: return json.loads(payload["text"])'


def test_a_line_moved_by_an_edit_elsewhere_keeps_its_group(tmp_path):
    body = "def handle(payload):\n    helper = payload['n']\n    raise RuntimeError(f'job {helper} failed')\n"
    v1 = load(tmp_path, "handlers_v1", body)
    v2 = load(tmp_path, "handlers_v2", "import os\n\n\n# a comment\n" + body)
    a, tb_a = failure(v1.handle, {"n": 1})
    b, tb_b = failure(v2.handle, {"n": 2})
    assert "line 3" in tb_a and "line 7" in tb_b
    assert fingerprint(a, tb_a).split(":", 1)[1] == fingerprint(b, tb_b).split(":", 1)[1]  # after the file name


def shared_helper(n: int) -> None:
    raise ConnectionError(f"upstream said 503 for item {n}")


def test_a_helper_is_named_under_the_handler_that_called_it():
    def fetch(payload):
        return shared_helper(payload["n"])

    def sync(payload):
        return shared_helper(payload["n"])

    a, b = fingerprint(*failure(fetch, {"n": 1})), fingerprint(*failure(fetch, {"n": 2}))
    assert a == b == ("ConnectionError at test_fingerprint.py:fetch > shared_helper: "
                      'raise ConnectionError(f"upstream said 503 for item {n}")')
    assert fingerprint(*failure(sync, {"n": 1})) != a  # one helper under two handlers: two groups


def test_a_long_key_keeps_a_hash_of_what_was_cut(tmp_path):
    pad = "x" * 150
    body = (f"def handle(payload):\n    if payload['a']:\n        raise ValueError('{pad}' + 'one')\n"
            f"    raise ValueError('{pad}' + 'two')\n")
    mod = load(tmp_path, "long_lines", body)
    a, b = fingerprint(*failure(mod.handle, {"a": True})), fingerprint(*failure(mod.handle, {"a": False}))
    assert len(a) == len(b) == MAX_FINGERPRINT and a != b and a[:-7] == b[:-7]


def test_only_the_last_traceback_of_a_chain_counts():
    def handler(payload):
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("lookup failed") from exc

    error, tb = failure(handler)
    assert "KeyError" in tb
    assert fingerprint(error, tb) == \
        'RuntimeError at test_fingerprint.py:handler: raise RuntimeError("lookup failed") from exc'


def test_simulated_handlers_are_the_handlers_own_code():
    from qkit.engine.handlers import get_handler

    sim = get_handler("web_scraping")
    error, tb = failure(sim.func, {"simulate": {"fail_rate": 1.0}, "url": "https://example.org"})
    assert fingerprint(error, tb).startswith("SimulatedFailure at handlers.py:web_scraping > _simulate: raise ")


def test_without_a_usable_traceback_the_message_decides():
    assert fingerprint("ValueError: x 5", "no traceback here") == "ValueError: x <*>"
    assert handler_frame("Traceback (most recent call last):\nValueError: x") is None


# ---------------------------------------------------------------- properties
ids = st.one_of(st.integers(0, 10**12).map(str), st.uuids().map(str), st.uuids().map(lambda u: u.hex),
                st.integers(1, 10**9).map(lambda n: f"job-{n}"), st.integers(0, 99).map(lambda n: f"x{n}"),
                st.integers(0, 2**64).map(hex), st.integers(-10**6, 10**6).map(str),
                st.floats(0, 1e6, allow_nan=False).map(lambda f: f"{f:.3f}"))
words = st.sampled_from(["order", "for", "user", "failed", "shard", "after", "retry", "id", "on", "(", ")", ","])


@settings(max_examples=200, deadline=None)
@given(template=st.lists(st.one_of(words, st.just(None)), min_size=1, max_size=12), a=st.data())
def test_messages_differing_only_in_numbers_and_ids_share_a_fingerprint(template, a):
    def fill() -> str:
        return " ".join(w if w is not None else a.draw(ids) for w in template)

    assert fingerprint("ValueError: " + fill()) == fingerprint("ValueError: " + fill())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_gives_a_short_fingerprint_and_masking_is_idempotent(text):
    fp = fingerprint("E: " + text)
    assert fp is not None and len(fp) <= MAX_FINGERPRINT
    assert mask(mask(text)) == mask(text)
    assert not any(c.isdigit() for c in mask(text.replace("'", "").replace('"', "")))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=2000), st.text(max_size=2000))
def test_any_error_and_traceback_text_is_accepted(error, tb):
    fp = fingerprint(error, tb)
    assert fp is None or len(fp) <= MAX_FINGERPRINT

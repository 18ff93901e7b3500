"""qkit.model without servers: names, job ids, payload checks and caps, strict JSON parsing."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from qkit.errors import BadInput
from qkit.model import (MAX_DELAY_SECONDS, MAX_ID, MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, check_job_id, check_name,
                        check_payload, compact_json, json_depth, jsonable, new_job, new_job_from_item,
                        parse_json_object, read_json_file)


@pytest.mark.parametrize("name", ["a", "emails", "web_scraping.v2-x", "0" * 64])
def test_names_accepted(name):
    assert check_name(name, "queue") == name


@pytest.mark.parametrize("name", ["", "A", "a b", "a/b", "é", "a" * 65, None, 3, "{q}"])
def test_names_refused_in_one_line(name):
    with pytest.raises(BadInput, match="^queue .* is invalid: use 1-64 characters"):
        check_name(name, "queue")


@pytest.mark.parametrize("value", [0, -1, MAX_ID + 1, True, 1.0, "1", None])
def test_job_ids_refused(value):
    with pytest.raises(BadInput, match=f"^job id must be an integer 1..{MAX_ID}"):
        check_job_id(value)


def test_job_id_bounds_and_huge_numbers_not_echoed():
    assert check_job_id(1) == 1 and check_job_id(MAX_ID) == MAX_ID
    with pytest.raises(BadInput, match=r"\(got a larger number\)$"):
        check_job_id(10 ** 60)


def test_payload_text_is_compact_and_capped():
    assert check_payload({"b": [1, 2], "a": "é"}) == '{"b":[1,2],"a":"é"}'
    room = MAX_PAYLOAD_BYTES - len(compact_json({"x": ""}))
    assert len(check_payload({"x": "a" * room}).encode()) == MAX_PAYLOAD_BYTES
    with pytest.raises(BadInput, match=f"^payload is {MAX_PAYLOAD_BYTES + 1} bytes of compact JSON; the limit is"):
        check_payload({"x": "a" * (room + 1)})
    # the cap counts UTF-8 bytes, not characters
    with pytest.raises(BadInput, match="bytes of compact JSON"):
        check_payload({"x": "é" * (room // 2 + 1)})


@pytest.mark.parametrize("payload, message", [
    ([1], "^payload must be a JSON object \\(got list\\)$"),
    ({"x": float("nan")}, "^payload is not JSON-serialisable"),
    ({"x": {1, 2}}, "^payload is not JSON-serialisable"),
    ({1: "a", "1": "b"}, "^payload has the key '1' twice once keys are JSON text$"),
    ({"x": "a\x00b"}, "^payload holds a NUL character"),
    ({"x": "\ud800"}, "^payload holds text that is not valid Unicode"),
])
def test_payloads_refused(payload, message):
    with pytest.raises(BadInput, match=message):
        check_payload(payload)


def test_depth_is_counted_without_recursion_and_capped():
    deep: dict = {}
    inner = deep
    for _ in range(MAX_JSON_DEPTH - 1):
        inner["a"] = {}
        inner = inner["a"]
    assert json_depth(deep) == MAX_JSON_DEPTH and check_payload(deep)
    inner["a"] = [1]
    with pytest.raises(BadInput, match=f"^payload nests deeper than {MAX_JSON_DEPTH} levels"):
        check_payload(deep)
    cyclic: list = []
    cyclic.append(cyclic)
    assert json_depth(cyclic) == MAX_JSON_DEPTH + 1


@pytest.mark.parametrize("text, message", [
    ('{"a": NaN}', "is not valid JSON: NaN is not JSON"),
    ('{"a": 1e999}', "is not valid JSON: number 1e999 is out of range"),
    ('{"a": 1, "a": 2}', "is not valid JSON: key 'a' appears twice in one object"),
    ('{"a": ', "is not valid JSON: Expecting value at line 1 column 7"),
    ('[1]', "must be a JSON object \\(got list\\)"),
    (b'{"a": "\xff"}', "is not UTF-8 text \\(byte 0xff at offset 7\\)"),
    ("[" * 100000, f"nests deeper than {MAX_JSON_DEPTH} levels"),
])
def test_strict_json_objects(text, message):
    with pytest.raises(BadInput, match=f"^payload {message}"):
        parse_json_object(text, "payload")


def test_json_objects_accepted():
    assert parse_json_object(b'{"a": [1, 2.5, "\xc3\xa9"]}', "body") == {"a": [1, 2.5, "é"]}


def test_json_file_read_bounded(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"n": 1}')
    assert read_json_file(str(path), "payload") == {"n": 1}
    path.write_bytes(b" " * (4 * MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(BadInput, match="is larger than"):
        read_json_file(str(path), "payload")
    with pytest.raises(BadInput, match="cannot be read"):
        read_json_file(str(tmp_path / "missing.json"), "payload")


def test_new_job_checks_every_field():
    job = new_job("t", {"a": 1}, priority=-5, max_attempts=1, delay=2, key="k-1")
    assert (job.priority, job.max_attempts, job.delay, job.key, job.payload_text) == (-5, 1, 2.0, "k-1", '{"a":1}')
    for kw, message in [({"priority": 10 ** 7}, "^priority 10000000 is out of range"),
                        ({"priority": True}, "^priority must be an integer"),
                        ({"max_attempts": 0}, "^max_attempts 0 is out of range"),
                        ({"delay": -1}, "^delay -1 is out of range"),
                        ({"delay": float("inf")}, "^delay inf is out of range"),
                        ({"delay": MAX_DELAY_SECONDS + 1}, "is out of range"),
                        ({"delay": "5"}, "^delay must be a number of seconds \\(got str\\)$"),
                        ({"key": ""}, "^key must be a non-empty string"),
                        ({"key": "a\x00"}, "^key holds a NUL character")]:
        with pytest.raises(BadInput, match=message):
            new_job("t", {}, **kw)


def test_batch_items_name_their_position():
    assert new_job_from_item({"type": "t"}, 0).payload == {}
    for item, message in [([], "^item 3: must be an object"), ({"type": "t", "prio": 1}, "^item 3: unknown option\\(s\\) prio$"),
                          ({"payload": {}}, "^item 3: 'type' is missing$"),
                          ({"type": "T"}, "^item 3: job type 'T' is invalid")]:
        with pytest.raises(BadInput, match=message):
            new_job_from_item(item, 3)


def test_jsonable_makes_rows_dumpable():
    when = datetime(2025, 1, 31, 12, tzinfo=timezone.utc)
    value = jsonable({1: (when, [when]), "x": None})
    assert value == {"1": ["2025-01-31T12:00:00+00:00", ["2025-01-31T12:00:00+00:00"]], "x": None}
    json.dumps(value)

"""The job model (docs/semantics.md#jobs): what a job is, and what input is refused (#bad-input-and-caps).

Validation happens here, before anything is written, so a refused call
leaves the ledger and Redis exactly as they were.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qkit.errors import BadInput

STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
OUTCOMES = ("completed", "failed", "timeout", "lost")
NAME_RE = re.compile(r"[a-z0-9_.-]{1,64}")
PRIORITY_MIN, PRIORITY_MAX = -1_000_000, 1_000_000
MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX = 1, 100
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_KEY_LENGTH = 256
#: jobs.owner: a signed-in API user's JWT ``sub``
MAX_OWNER_LENGTH = 256
MAX_DELAY_SECONDS = 366 * 24 * 3600
#: deepest nesting of objects and arrays in a payload (the HTTP API parses bodies with the same cap)
MAX_JSON_DEPTH = 64
#: a JSON \u0000 escape (after an even number of backslashes, so not an escaped "\\u0000" text)
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
#: the largest job id: SQLite INTEGER and PostgreSQL BIGINT hold 2**63 - 1, so larger ids cannot exist
MAX_ID = 2**63 - 1
#: a payload read from a file (``--payload @file``) is refused past this many bytes, before parsing
#: (pretty-printed JSON is larger than the compact text the payload limit counts)
MAX_PAYLOAD_FILE_BYTES = 4 * MAX_PAYLOAD_BYTES
#: the keys an ``enqueue_many`` item may carry
ITEM_KEYS = frozenset({"type", "payload", "priority", "max_attempts", "delay", "key"})
#: values that end a JSON walk: a payload object holding only these is one level deep with nothing to collide
_LEAF_TYPES = frozenset({str, int, float, bool, type(None)})
_STR_TYPE = frozenset({str})


#: one encoder for every call: ``json.dumps`` with options builds a new one each time (half its cost for a small value)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def compact_json(value: Any) -> str:
    """The canonical text of a JSON value: compact, UTF-8, no NaN."""
    return _COMPACT(value)


def jsonable(value: Any) -> Any:
    """``value`` with datetimes as ISO text, tuples as lists and keys as text: ready for ``json.dumps``."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def check_name(value: Any, what: str) -> str:
    """A queue or type name: ``[a-z0-9_.-]{1,64}``."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise BadInput(f"{what} {value!r} is invalid: use 1-64 characters of a-z, 0-9, '_', '.', '-'")
    return value


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{what} must be an integer (got {type(value).__name__})")
    if not low <= value <= high:
        raise BadInput(f"{what} {value} is out of range {low}..{high}")
    return value


def check_job_id(value: Any, what: str = "job id") -> int:
    """A job id: an integer 1..2**63-1 (what the ledger's BIGINT holds)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        shown = repr(value) if not isinstance(value, int) or value.bit_length() < 128 else "a larger number"
        raise BadInput(f"{what} must be an integer 1..{MAX_ID} (got {shown})")
    return value


def refuse_json_constant(name: str) -> Any:
    """``parse_constant`` for json.loads: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def finite_json_float(text: str) -> float:
    """``parse_float`` for json.loads: a number past the float range (1e999) is refused, not infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json.loads: a key twice in one object is refused, not silently merged."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {dup[:40]!r} appears twice in one object")
    return out


def parse_json_object(text: str | bytes, what: str) -> dict[str, Any]:
    """Parse JSON text that must be an object, strictly; raise BadInput naming ``what`` and why.

    Refused: text that is not UTF-8, not JSON, NaN/Infinity, numbers out of range
    (a float past 1e308, an integer of more digits than Python converts), a key
    twice in one object, nesting deeper than :data:`MAX_JSON_DEPTH` (also when it
    is too deep for the parser itself), and any value but an object.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"{what} is not UTF-8 text (byte 0x{text[exc.start]:02x} at offset {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=refuse_json_constant, parse_float=finite_json_float,
                           object_pairs_hook=no_duplicate_keys)
    except RecursionError:
        raise BadInput(f"{what} nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # NaN, 1e999, an integer past the digit limit, a duplicate key
        raise BadInput(f"{what} is not valid JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(value, dict):
        raise BadInput(f"{what} must be a JSON object (got {type_name(value)})")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise BadInput(f"{what} nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays")
    return value


def read_json_file(path: str, what: str) -> dict[str, Any]:
    """A JSON object from a file, read bounded: refused past :data:`MAX_PAYLOAD_FILE_BYTES` without
    reading the rest (``/dev/zero`` is refused, not read whole)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PAYLOAD_FILE_BYTES + 1)
    except OSError as exc:
        raise BadInput(f"{what} file {path!r} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_PAYLOAD_FILE_BYTES:
        raise BadInput(f"{what} file {path!r} is larger than {MAX_PAYLOAD_FILE_BYTES} bytes")
    return parse_json_object(data, f"{what} file {path!r}")


def json_depth(value: Any) -> int:
    """Levels of objects and arrays in ``value`` (0 for a scalar), found without recursion.

    Stops counting past :data:`MAX_JSON_DEPTH` + 1 (a cyclic value is as deep as that).
    """
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_payload(payload: Any) -> str:
    """Return the compact JSON text of a valid payload, or refuse it."""
    if type(payload) is not dict and not isinstance(payload, Mapping):  # (a dict skips the ABC's check)
        raise BadInput(f"payload must be a JSON object (got {type(payload).__name__})")
    # the common payload, a flat dict with text keys, needs neither walk (enqueue_many validates per item)
    flat = (type(payload) is dict and _STR_TYPE.issuperset(map(type, payload))
            and _LEAF_TYPES.issuperset(map(type, payload.values())))
    if not flat:
        if json_depth(payload) > MAX_JSON_DEPTH:
            raise BadInput(f"payload nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays")
        _check_keys(payload)
    try:
        text = compact_json(payload if flat else dict(payload))
    except (TypeError, ValueError) as exc:  # ValueError: NaN, an integer past the digit limit
        raise BadInput(f"payload is not JSON-serialisable: {str(exc).split(';')[0]}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        # PostgreSQL's JSONB cannot hold it: refused on every ledger, so a payload that works on one works on all
        raise BadInput("payload holds a NUL character (\\u0000), which the ledger cannot store; "
                       "encode binary data (e.g. base64)")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise BadInput(f"payload holds text that is not valid Unicode (a lone surrogate U+{ord(exc.object[exc.start]):04X}"
                       "); the ledger stores UTF-8") from None
    if size > MAX_PAYLOAD_BYTES:
        raise BadInput(f"payload is {size} bytes of compact JSON; the limit is {MAX_PAYLOAD_BYTES}")
    return text


def _check_keys(payload: Mapping[str, Any]) -> None:
    """Refuse objects whose keys collide once JSON turns them into text (``{1: "a", "1": "b"}``).

    Only objects with a key that is not a ``str`` can collide; json.dumps would
    write both and the ledger would keep one, silently.
    """
    stack: list[Any] = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if not all(type(k) is str for k in item):
                texts = [_key_text(k) for k in item]
                if len(set(texts)) != len(texts):
                    dup = next(t for i, t in enumerate(texts) if t in texts[:i])
                    raise BadInput(f"payload has the key {dup[:40]!r} twice once keys are JSON text")
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _key_text(key: Any) -> Any:
    """The text json.dumps writes for a dict key (the key itself when json.dumps refuses it)."""
    try:
        return next(iter(json.loads(json.dumps({key: 0}))))
    except (TypeError, ValueError):
        return key


@dataclass(frozen=True)
class NewJob:
    """A validated enqueue request."""

    type: str
    payload: dict[str, Any]
    priority: int = 0
    max_attempts: int = 3
    delay: float = 0.0
    key: str | None = None
    #: the payload's compact JSON, computed once by validation and stored as is
    payload_text: str = field(default="{}", repr=False, compare=False)
    #: the API user (a JWT's ``sub``) creating it; None for everyone else
    owner: str | None = None


def new_job(type: Any, payload: Any, *, priority: Any = 0, max_attempts: Any = 3,
            delay: Any = 0, key: Any = None, owner: Any = None) -> NewJob:
    """Validate one enqueue request; raise BadInput saying what and why."""
    check_name(type, "job type")
    text = check_payload(payload)
    _check_int(priority, "priority", PRIORITY_MIN, PRIORITY_MAX)
    _check_int(max_attempts, "max_attempts", MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise BadInput(f"delay must be a number of seconds (got {type_name(delay)})")
    if (isinstance(delay, float) and not math.isfinite(delay)) or not 0 <= delay <= MAX_DELAY_SECONDS:
        raise BadInput(f"delay {delay} is out of range 0..{MAX_DELAY_SECONDS} seconds")
    if key is not None:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise BadInput(f"key must be a non-empty string of at most {MAX_KEY_LENGTH} characters")
        if "\x00" in key:
            raise BadInput("key holds a NUL character, which the ledger cannot store")
        if not key.isascii():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise BadInput("key holds text that is not valid Unicode (a lone surrogate); the ledger stores UTF-8") \
                    from None
    if owner is not None and (not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_LENGTH
                              or "\x00" in owner):
        raise BadInput(f"owner must be a non-empty string of at most {MAX_OWNER_LENGTH} characters without NUL")
    # positional (type, payload, priority, max_attempts, delay, key, payload_text, owner): once per enqueued job
    return NewJob(type, dict(payload), priority, max_attempts, float(delay), key, text, owner)


def new_job_from_item(item: Any, index: int) -> NewJob:
    """Validate one ``enqueue_many`` item, naming its position on refusal."""
    if type(item) is not dict and not isinstance(item, Mapping):  # (a dict skips the ABC's check)
        raise BadInput(f"item {index}: must be an object with 'type' and 'payload'")
    unknown = () if ITEM_KEYS.issuperset(item) else set(item) - ITEM_KEYS
    if unknown:
        raise BadInput(f"item {index}: unknown option(s) {', '.join(sorted(map(str, unknown)))}")
    if "type" not in item:
        raise BadInput(f"item {index}: 'type' is missing")
    try:
        return new_job(item["type"], item.get("payload", {}), priority=item.get("priority", 0),
                       max_attempts=item.get("max_attempts", 3), delay=item.get("delay", 0),
                       key=item.get("key"))
    except BadInput as exc:
        raise BadInput(f"item {index}: {exc}") from None


def type_name(value: Any) -> str:
    return type(value).__name__


@dataclass
class Job:
    """A job as the ledger knows it (``q.get(id)``; fields: docs/semantics.md#jobs)."""

    id: int
    queue: str
    type: str
    payload: dict[str, Any]
    status: str
    priority: int
    attempts: int
    max_attempts: int
    result: Any = None
    error: str | None = None
    idempotency_key: str | None = None
    run_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    epoch: int = 0
    owner: str | None = None
    #: the handler's last progress report (current_job().progress): 0..1, its note and when (throttled writes)
    progress: float | None = None
    progress_note: str | None = None
    progress_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (times as ISO 8601 UTC)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass
class WorkSummary:
    """What one burst did (``q.work()``; docs/semantics.md#workers-and-bursts)."""

    worker: str
    run_id: int | None = None
    processed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0
    fenced: int = 0
    cancelled: int = 0  # attempts that ended with their job cancelled (its cancel was requested meanwhile)
    released: int = 0  # claimed but handed back unrun when the burst stopped: not retries, no attempt spent
    seconds: float = 0.0
    stopped_by: str = "empty"
    #: when the burst ended: jobs waiting for a retry (pending after a failed attempt, not yet due), and
    #: in how many seconds the next of them is due (None: none waiting)
    waiting_retry: int = 0
    next_retry_s: float | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

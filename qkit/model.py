"""The job model (SPEC §3): what a job is, and what input is refused.

Validation happens here, before anything is written, so a refused call
leaves the ledger and Redis exactly as they were.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

from qkit.errors import BadInput

STATUSES = ("pending", "processing", "completed", "failed")
OUTCOMES = ("completed", "failed", "timeout", "lost")
NAME_RE = re.compile(r"[a-z0-9_.-]{1,64}")
PRIORITY_MIN, PRIORITY_MAX = -1_000_000, 1_000_000
MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX = 1, 100
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_KEY_LENGTH = 256
MAX_DELAY_SECONDS = 366 * 24 * 3600
#: deepest nesting of objects and arrays in a payload (the HTTP API parses bodies with the same cap)
MAX_JSON_DEPTH = 64
#: a JSON \u0000 escape (after an even number of backslashes, so not an escaped "\\u0000" text)
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
#: the keys an ``enqueue_many`` item may carry
ITEM_KEYS = frozenset({"type", "payload", "priority", "max_attempts", "delay", "key"})


def compact_json(value: Any) -> str:
    """The canonical text of a JSON value: compact, UTF-8, no NaN."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


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
    if not isinstance(payload, Mapping):
        raise BadInput(f"payload must be a JSON object (got {type(payload).__name__})")
    if json_depth(payload) > MAX_JSON_DEPTH:
        raise BadInput(f"payload nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays")
    try:
        text = compact_json(dict(payload))
    except (TypeError, ValueError) as exc:
        raise BadInput(f"payload is not JSON-serialisable: {exc}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        # PostgreSQL's JSONB cannot hold it: refused on every ledger, so a payload that works on one works on all
        raise BadInput("payload holds a NUL character (\\u0000), which the ledger cannot store; "
                       "encode binary data (e.g. base64)")
    size = len(text.encode("utf-8"))
    if size > MAX_PAYLOAD_BYTES:
        raise BadInput(f"payload is {size} bytes of compact JSON; the limit is {MAX_PAYLOAD_BYTES}")
    return text


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


def new_job(type: Any, payload: Any, *, priority: Any = 0, max_attempts: Any = 3,
            delay: Any = 0, key: Any = None) -> NewJob:
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
    return NewJob(type=type, payload=dict(payload), priority=priority, max_attempts=max_attempts,
                  delay=float(delay), key=key, payload_text=text)


def new_job_from_item(item: Any, index: int) -> NewJob:
    """Validate one ``enqueue_many`` item, naming its position on refusal."""
    if not isinstance(item, Mapping):
        raise BadInput(f"item {index}: must be an object with 'type' and 'payload'")
    unknown = set(item) - ITEM_KEYS
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
    """A job as the ledger knows it (SPEC §4: ``q.get(id)``)."""

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (times as ISO 8601 UTC)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass
class WorkSummary:
    """What one burst did (SPEC §4: ``q.work()``)."""

    worker: str
    run_id: int | None = None
    processed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0
    fenced: int = 0
    seconds: float = 0.0
    stopped_by: str = "empty"
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

"""What a request may carry: bodies read under a cap, JSON parsed strictly, fields and query checked.

Each refusal names its reason (and the field at fault): 400 for a body that is
not a JSON object, 408 for a body too slow, 413 past a size cap, 422 for a
field or query parameter out of range.  The burst caps (``QKIT_API_MAX_*``)
are read once, at app creation.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import anyio
from starlette.requests import Request

from qkit.api.errors import ApiError
from qkit.errors import BadInput, ConfigError
from qkit.model import (MAX_PAYLOAD_BYTES, NAME_RE, STATUSES, compact_json, finite_json_float, new_job,
                        no_duplicate_keys, refuse_json_constant)

#: a POST /api/jobs body: the 256 KiB payload plus room for the envelope
MAX_BODY_BYTES = MAX_PAYLOAD_BYTES + 44 * 1024
#: a POST /api/workers body holds two numbers
MAX_WORKER_BODY_BYTES = 16 * 1024
MAX_JSON_DEPTH = 64
#: a slow client may not hold a request open forever while sending its body
BODY_READ_TIMEOUT = 30.0
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 100, 1000
#: largest id SQLite and PostgreSQL BIGINT hold; larger ids cannot exist
MAX_ID = 2**63 - 1
DEFAULT_API_MAX_SECONDS = 25.0
DEFAULT_API_MAX_JOBS = 1000

JOB_FIELDS = ("type", "payload", "priority", "max_attempts", "delay", "key")
WORKER_FIELDS = ("max_jobs", "max_seconds")
LIST_PARAMS = ("status", "type", "limit", "before_id")
_DIGITS = re.compile(r"[0-9]{1,20}")


# --------------------------------------------------------------------------- reading
async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 past ``limit`` bytes without reading the rest.

    A declared ``Content-Length`` is checked before anything is read; a chunked
    body is counted while it streams.  408 if the client stalls.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _DIGITS.fullmatch(declared.strip()):
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    body = bytearray()
    with anyio.move_on_after(BODY_READ_TIMEOUT) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    if scope.cancelled_caught:
        raise ApiError(408, f"the request body did not arrive within {BODY_READ_TIMEOUT:g} s",
                       headers={"Connection": "close"})
    return bytes(body)


def _too_large(limit: int) -> ApiError:
    # Connection: close -- the unread rest of the body must not be parsed as a next request
    return ApiError(413, f"request body is larger than {limit} bytes", headers={"Connection": "close"})


# --------------------------------------------------------------------------- parsing
def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def parse_object(body: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """Parse a JSON object body; 400 for anything that is not one."""
    if empty_ok and not body.strip():
        return {}
    try:
        value = json.loads(body, parse_constant=refuse_json_constant, parse_float=finite_json_float,
                           object_pairs_hook=no_duplicate_keys)
    except RecursionError:
        raise ApiError(400, f"body is not valid JSON: it nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, huge numbers
        msg = f"{exc.msg} at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) \
            else str(exc)
        raise ApiError(400, f"body is not valid JSON: {msg}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"body must be a JSON object (got {_json_kind(value)})")
    if not _depth_ok(value, MAX_JSON_DEPTH):
        raise ApiError(400, f"body is not valid JSON: it nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _integral(body: dict[str, Any], names: Sequence[str]) -> None:
    """JSON has one number type: 44.0 is the integer 44 (as JSON Schema's "integer" says)."""
    for name in names:
        value = body.get(name)
        if isinstance(value, float) and value.is_integer():
            body[name] = int(value)


def _refuse_huge(body: Mapping[str, Any], names: Sequence[str]) -> None:
    """An integer too large for a float is out of every range here (and would
    make ``math.isfinite`` raise OverflowError instead of a clean refusal)."""
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            raise ApiError(422, f"{name} is out of range", field=name)


def _refuse_unknown(body: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})", field=unknown[0])


# --------------------------------------------------------------------------- POST /api/jobs
def job_body(raw: bytes) -> dict[str, Any]:
    """A ``POST /api/jobs`` body, checked field by field (so a refusal names the field at fault)."""
    body = parse_object(raw)
    _refuse_unknown(body, JOB_FIELDS)
    _integral(body, ("priority", "max_attempts"))
    _refuse_huge(body, ("priority", "max_attempts", "delay"))
    _check_job_fields(body)
    return body


def _check_job_fields(body: Mapping[str, Any]) -> None:
    if "type" not in body:
        raise ApiError(422, "type is required", field="type")
    if "payload" not in body:
        raise ApiError(422, "payload is required (a JSON object; {} for none)", field="payload")
    payload = body["payload"]
    if isinstance(payload, dict):
        try:
            size = len(compact_json(payload).encode("utf-8"))
        except (TypeError, ValueError) as exc:
            raise ApiError(422, f"payload is not JSON-serialisable: {exc}", field="payload") from None
        if size > MAX_PAYLOAD_BYTES:
            raise ApiError(413, f"payload is {size} bytes of compact JSON; the limit is {MAX_PAYLOAD_BYTES}",
                           field="payload")
    checks: list[tuple[str, dict[str, Any]]] = [
        ("type", {"type": body["type"], "payload": {}}),
        ("payload", {"type": "t", "payload": payload}),
    ] + [(name, {"type": "t", "payload": {}, name: body[name]})
         for name in ("priority", "max_attempts", "delay", "key") if name in body]
    for name, kwargs in checks:
        try:
            new_job(kwargs.pop("type"), kwargs.pop("payload"), **kwargs)
        except BadInput as exc:
            raise ApiError(422, str(exc), field=name) from None


# --------------------------------------------------------------------------- GET /api/jobs, /api/jobs/{id}
def check_query(params: Any, allowed: Sequence[str]) -> None:
    """422 for a query parameter not in ``allowed`` or given more than once (``params``: Starlette QueryParams)."""
    for name in params.keys():
        if name not in allowed:
            raise ApiError(422, f"unknown query parameter {name!r} (allowed: {', '.join(allowed)})", field=name)
        if len(params.getlist(name)) > 1:
            raise ApiError(422, f"query parameter {name!r} is given more than once", field=name)


def name_param(params: Any, name: str) -> str | None:
    """A queue or type name from the query (None when absent); 422 when it is not a valid name."""
    if name not in params:
        return None
    if not NAME_RE.fullmatch(params[name]):
        raise ApiError(422, f"{name} must be 1-64 characters of a-z, 0-9, '_', '.', '-'", field=name)
    return params[name]


def id_param(params: Any, name: str, high: int = MAX_ID) -> int | None:
    """An integer 1..``high`` from the query (None when absent); 422 otherwise."""
    return _id_like(params[name], name, high) if name in params else None


def page_query(params: Any) -> tuple[int, int | None]:
    """``(limit, before_id)`` of a paged list (``limit`` 1..1000, default 100)."""
    return id_param(params, "limit", MAX_LIST_LIMIT) or DEFAULT_LIST_LIMIT, id_param(params, "before_id")


def list_query(params: Any) -> dict[str, Any]:
    """``status``, ``type``, ``limit``, ``before_id`` of a ``GET /api/jobs`` query (a Starlette QueryParams)."""
    check_query(params, LIST_PARAMS)
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(422, f"status must be one of {', '.join(STATUSES)}", field="status")
    limit, before_id = page_query(params)
    return {"status": status, "type": name_param(params, "type"), "limit": limit, "before_id": before_id}


def _id_like(raw: str, name: str, high: int) -> int:
    if not is_id_text(raw, high):
        raise ApiError(422, f"{name} must be an integer 1..{high}", field=name)
    return int(raw)


def is_id_text(raw: str, high: int = MAX_ID) -> bool:
    """True when ``raw`` is the decimal text of an integer 1..``high``."""
    return bool(_DIGITS.fullmatch(raw)) and 1 <= int(raw) <= high


# --------------------------------------------------------------------------- POST /api/workers
@dataclass(frozen=True)
class ApiLimits:
    """Server-side caps on one HTTP-triggered burst (read once, at app creation)."""

    max_seconds: float = DEFAULT_API_MAX_SECONDS
    max_jobs: int = DEFAULT_API_MAX_JOBS


def api_limits() -> ApiLimits:
    """``QKIT_API_MAX_SECONDS`` (default 25) and ``QKIT_API_MAX_JOBS`` (default 1000)."""
    raw_s = os.environ.get("QKIT_API_MAX_SECONDS", "").strip()
    raw_j = os.environ.get("QKIT_API_MAX_JOBS", "").strip()
    try:
        seconds = float(raw_s) if raw_s else DEFAULT_API_MAX_SECONDS
    except ValueError:
        raise ConfigError(f"QKIT_API_MAX_SECONDS={raw_s!r} is not a number") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"QKIT_API_MAX_SECONDS={raw_s!r} must be a number > 0")
    if raw_j and not (raw_j.isdigit() and int(raw_j) >= 1):
        raise ConfigError(f"QKIT_API_MAX_JOBS={raw_j!r} must be an integer >= 1")
    return ApiLimits(max_seconds=seconds, max_jobs=int(raw_j) if raw_j else DEFAULT_API_MAX_JOBS)


def burst_budget(raw: bytes, limits: ApiLimits) -> dict[str, Any]:
    """``{max_jobs, max_seconds}`` of a ``POST /api/workers`` body, clamped to the server's caps."""
    body = parse_object(raw, empty_ok=True)
    _refuse_unknown(body, WORKER_FIELDS)
    _integral(body, ("max_jobs",))
    _refuse_huge(body, ("max_seconds",))  # max_jobs is only compared, never converted
    max_jobs = body.get("max_jobs", limits.max_jobs)
    if isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1:
        raise ApiError(422, "max_jobs must be an integer >= 1", field="max_jobs")
    max_seconds = body.get("max_seconds", limits.max_seconds)
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds > 0:
        raise ApiError(422, "max_seconds must be a number > 0", field="max_seconds")
    return {"max_jobs": min(max_jobs, limits.max_jobs), "max_seconds": float(min(max_seconds, limits.max_seconds))}

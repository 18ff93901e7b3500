"""The dead-letter queue over HTTP: ``GET /api/dlq`` (jobs, or groups by error fingerprint),
``POST /api/dlq/replay`` and ``POST /api/dlq/purge`` (with a dry run).

Operator routes (:func:`qkit.api.roles.authorize` with ``operator``): admins and
readers list, only admins replay and purge.  The work is the queue's own
(:meth:`qkit.engine.queue.Queue.replay`, :meth:`~qkit.engine.queue.Queue.purge_dead`,
:mod:`qkit.ops.triage`), as ``qkit dlq`` does it.
"""
from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qkit.api.bodies import DEFAULT_LIST_LIMIT, MAX_ID, MAX_LIST_LIMIT, id_param, parse_object, read_body
from qkit.api.errors import ApiError, guard
from qkit.api.holder import holder
from qkit.api.openapi import AUTH_ERRORS, error_response, json_response
from qkit.api.roles import authorize, operator_query
from qkit.api.routes_ops import known_queue
from qkit.errors import BadInput
from qkit.model import NAME_RE, jsonable
from qkit.text import clip

#: a replay or purge body: a list of ids and a few fields
MAX_DLQ_BODY_BYTES = 256 * 1024
MAX_IDS = 10_000
#: rows carry at most this much of a job's error (the full text is on GET /api/jobs/{id})
ERROR_CHARS = 1000
#: the largest ``older_than`` in seconds (the ledger's dates end before 100 years from now)
MAX_AGE_S = 100 * 366 * 86400
_FLAGS = {"1": True, "true": True, "0": False, "false": False}


def _queue(request: Request, name: str | None) -> Any:
    return known_queue(holder(request), name)


def _row(job: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in job.items() if k not in ("payload", "result")}
    out["error"] = clip(out.get("error"), ERROR_CHARS) if out.get("error") else out.get("error")
    return jsonable(out)


def _group(group: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in group.items() if k != "sample_payload"}
    out["sample_error"] = clip(out["sample_error"], ERROR_CHARS) if out.get("sample_error") else None
    return jsonable(out)


# --------------------------------------------------------------------------- bodies
def _body(raw: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    body = parse_object(raw, empty_ok=True)
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})", field=unknown[0])
    if "queue" in body and not (isinstance(body["queue"], str) and NAME_RE.fullmatch(body["queue"])):
        raise ApiError(422, "queue must be 1-64 characters of a-z, 0-9, '_', '.', '-'", field="queue")
    if "ids" in body:
        ids = body["ids"]
        if (not isinstance(ids, list) or not 1 <= len(ids) <= MAX_IDS
                or not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= MAX_ID for i in ids)):
            raise ApiError(422, f"ids must be a list of 1..{MAX_IDS} job ids (integers 1..{MAX_ID})", field="ids")
    if "fingerprint" in body and not (isinstance(body["fingerprint"], str) and body["fingerprint"].strip()
                                      and len(body["fingerprint"]) <= 1000):
        raise ApiError(422, "fingerprint must be a fingerprint's text or its short id", field="fingerprint")
    for flag in ("all", "dry_run"):
        if flag in body and not isinstance(body[flag], bool):
            raise ApiError(422, f"{flag} must be true or false", field=flag)
    return body


def _older_than(value: Any) -> Any:
    """Seconds (a number 0..100 years) or an age like ``"7d"``, checked as the queue checks it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) \
            or (not isinstance(value, str) and not 0 <= value <= MAX_AGE_S):
        raise ApiError(422, f"older_than must be seconds 0..{MAX_AGE_S} or an age like 7d, 12h",
                       field="older_than")
    if isinstance(value, str):
        from qkit.ops.retention import parse_age

        try:
            parse_age(value)
        except BadInput as exc:
            raise ApiError(422, str(exc), field="older_than") from None
    return value


# --------------------------------------------------------------------------- routes
@guard
async def dlq_list(request: Request) -> Response:
    """GET /api/dlq?queue=Q[&group=1][&limit=N]"""
    params, name = await operator_query(request, ("queue", "group", "limit"))
    if "group" in params and params["group"] not in _FLAGS:
        raise ApiError(422, "group must be 1, 0, true or false", field="group")
    group = _FLAGS.get(params.get("group", "0"), False)
    limit = id_param(params, "limit", MAX_LIST_LIMIT) or DEFAULT_LIST_LIMIT

    def run() -> dict[str, Any]:
        from qkit.ops.triage import dead_rows, group_rows

        q = _queue(request, name)
        if group:
            return {"queue": q.name, "groups": [_group(g) for g in group_rows(q)]}
        return {"queue": q.name, "jobs": [_row(r) for r in dead_rows(q, limit)]}

    return JSONResponse(await run_in_threadpool(run))


@guard
async def dlq_replay(request: Request) -> Response:
    """POST /api/dlq/replay: ``{"ids": [...]}`` or ``{"fingerprint": ...}`` or ``{"all": true}``"""
    await authorize(request, write=True, operator=True)
    body = _body(await read_body(request, MAX_DLQ_BODY_BYTES), ("ids", "fingerprint", "all", "queue"))
    chosen = [k for k in ("ids", "fingerprint", "all") if k in body and body[k] is not False]
    if len(chosen) != 1:
        raise ApiError(422, "give exactly one of ids, fingerprint or all (true)")

    def run() -> list[int]:
        q = _queue(request, body.get("queue"))
        if "ids" in chosen:
            return q.replay(body["ids"])
        return q.replay_fingerprint(body["fingerprint"]) if "fingerprint" in chosen else q.replay_all()

    return JSONResponse({"replayed": await run_in_threadpool(run)})


@guard
async def dlq_purge(request: Request) -> Response:
    """POST /api/dlq/purge: ``{"dry_run": bool, "ids": [...], "fingerprint": ..., "older_than": ...}``
    or ``{"all": true}`` for every job of the DLQ."""
    await authorize(request, write=True, operator=True)
    body = _body(await read_body(request, MAX_DLQ_BODY_BYTES),
                 ("dry_run", "ids", "fingerprint", "older_than", "all", "queue"))
    older_than = _older_than(body["older_than"]) if "older_than" in body else None
    filtered = any(k in body for k in ("ids", "fingerprint", "older_than"))
    if filtered == bool(body.get("all")):
        raise ApiError(422, "give filters (ids, fingerprint, older_than) or all (true), not both and not neither")
    dry_run = body.get("dry_run", False)

    def run() -> int:
        q = _queue(request, body.get("queue"))
        return q.purge_dead(body.get("ids"), fingerprint=body.get("fingerprint"), older_than=older_than,
                            dry_run=dry_run)

    n = await run_in_threadpool(run)
    return JSONResponse({"dry_run": True, "would_purge": n} if dry_run else {"dry_run": False, "purged": n})


ROUTES = [
    Route("/api/dlq", dlq_list, methods=["GET"]),
    Route("/api/dlq/replay", dlq_replay, methods=["POST"]),
    Route("/api/dlq/purge", dlq_purge, methods=["POST"]),
]

# --------------------------------------------------------------------------- OpenAPI
_COUNT = {"type": "integer", "minimum": 0}
_IDS = {"type": "array", "minItems": 1, "maxItems": MAX_IDS, "items": {"type": "integer", "minimum": 1,
                                                                        "maximum": MAX_ID}}
_QUEUE = {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$", "description": "default: the served queue"}
_FINGERPRINT = {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": r"\S",
                "description": "a fingerprint's text or its short id (GET /api/dlq?group=1)"}
_TIME = {"type": ["string", "null"], "format": "date-time"}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "DeadJob": {"type": "object", "required": ["id", "queue", "type", "status", "fingerprint", "fingerprint_id"],
                "properties": {"id": {"type": "integer"}, "queue": {"type": "string"}, "type": {"type": "string"},
                               "status": {"type": "string"}, "attempts": _COUNT, "max_attempts": _COUNT,
                               "error": {"type": ["string", "null"]}, "finished_at": _TIME, "created_at": _TIME,
                               "fingerprint": {"type": "string"}, "fingerprint_id": {"type": "string"}}},
    "DeadGroup": {"type": "object", "required": ["fingerprint_id", "fingerprint", "type", "jobs", "job_ids"],
                  "properties": {"fingerprint_id": {"type": "string"}, "fingerprint": {"type": "string"},
                                 "type": {"type": "string"}, "jobs": _COUNT, "first_seen": _TIME,
                                 "last_seen": _TIME, "sample_id": {"type": "integer"},
                                 "sample_error": {"type": ["string", "null"]},
                                 "job_ids": {"type": "array", "items": {"type": "integer"}}}},
    "DeadList": {"type": "object", "required": ["queue"],
                 "properties": {"queue": {"type": "string"},
                                "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/DeadJob"}},
                                "groups": {"type": "array", "items": {"$ref": "#/components/schemas/DeadGroup"}}}},
    "DeadReplay": {"type": "object", "additionalProperties": False,
                   "properties": {"ids": _IDS, "fingerprint": _FINGERPRINT, "all": {"type": "boolean"},
                                  "queue": _QUEUE},
                   "description": "exactly one of ids, fingerprint or all (true)"},
    "Replayed": {"type": "object", "required": ["replayed"],
                 "properties": {"replayed": {"type": "array", "items": {"type": "integer"}}}},
    "DeadPurge": {"type": "object", "additionalProperties": False,
                  "properties": {"dry_run": {"type": "boolean", "default": False}, "ids": _IDS,
                                 "fingerprint": _FINGERPRINT,
                                 "older_than": {"oneOf": [{"type": "number", "minimum": 0, "maximum": MAX_AGE_S},
                                                          {"type": "string", "pattern": r"^\d+(\.\d+)?[smhdw]$"}],
                                                "description": "seconds, or an age like 7d, 12h"},
                                 "all": {"type": "boolean"}, "queue": _QUEUE},
                  "description": "filters (ids, fingerprint, older_than: a job must match each given) or all (true)"},
    "Purged": {"type": "object", "required": ["dry_run"],
               "properties": {"dry_run": {"type": "boolean"}, "purged": _COUNT, "would_purge": _COUNT}},
}

_BAD_BODY = {"400": error_response("Body is not a JSON object"), "408": error_response("Body too slow"),
             "413": error_response("Body too large"),
             "422": error_response("A field is invalid, unknown or missing (named in `field` when one is at fault)")}
_UNKNOWN_QUEUE = error_response("No such queue in the ledger (or, for a replay, no such job or fingerprint)")


def _post(operation: str, summary: str, request: str, answer: str, description: str,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"post": {"operationId": operation, "summary": summary, "security": [{"apiToken": []}],
                     "requestBody": {"required": True,
                                     "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                                         f"{request}"}}}},
                     "responses": {"200": json_response(description, answer), "404": _UNKNOWN_QUEUE,
                                   **_BAD_BODY, **(extra or {}), **AUTH_ERRORS}}}


OPENAPI_PATHS: dict[str, Any] = {
    "/api/dlq": {"get": {
        "operationId": "listDlq", "summary": "A queue's DLQ, newest failure first, or grouped by error fingerprint "
                                             "(admins and readers)",
        "security": [{"apiToken": []}],
        "parameters": [{"name": "queue", "in": "query", "schema": _QUEUE},
                       {"name": "group", "in": "query", "schema": {"type": "string", "enum": list(_FLAGS)}},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                   "maximum": MAX_LIST_LIMIT,
                                                                   "default": DEFAULT_LIST_LIMIT}}],
        "responses": {"200": json_response("`jobs` (payloads left out), or `groups` with group=1", "DeadList"),
                      "404": error_response("No such queue in the ledger"),
                      "422": error_response("A query parameter is invalid or unknown (named in `field`)"),
                      **AUTH_ERRORS},
    }},
    "/api/dlq/replay": _post("replayDlq", "Replay DLQ jobs to pending with a fresh attempt budget (admins)",
                             "DeadReplay", "Replayed", "The ids replayed",
                             {"409": error_response("A job is not failed (nothing was replayed)")}),
    "/api/dlq/purge": _post("purgeDlq", "Delete DLQ jobs with their history, or count them with dry_run (admins)",
                            "DeadPurge", "Purged", "How many were purged (`would_purge` with dry_run)"),
}

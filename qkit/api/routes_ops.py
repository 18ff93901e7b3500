"""The operator's read routes: ``GET /api/queues`` (every queue of the ledger), ``GET /api/stats?queue=Q``,
``GET /api/runs`` (worker bursts, paged).

Admins and readers only (:func:`qkit.api.roles.authorize` with ``operator``):
a signed-in user reaches only their own jobs.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qkit.api.bodies import DEFAULT_LIST_LIMIT, MAX_ID, MAX_LIST_LIMIT, page_query
from qkit.api.errors import guard
from qkit.api.holder import holder
from qkit.api.openapi import AUTH_ERRORS, error_response, json_response
from qkit.api.roles import operator_query
from qkit.errors import NotFound
from qkit.ledger.reads import queue_runs
from qkit.ops.queues import queue_rows
from qkit.model import STATUSES, jsonable


def known_queue(hold: Any, name: str | None) -> Any:
    """The queue ``name`` (the served one when None); NotFound for a name the ledger does not know."""
    if name is None or name == hold.name:
        return hold.get()
    if name not in hold.get().ledger.queue_names():  # before a view is made: no view for every name asked
        raise NotFound(f"no queue {name!r} in the ledger")
    return hold.named(name)


# --------------------------------------------------------------------------- routes
@guard
async def queues(request: Request) -> Response:
    """GET /api/queues"""
    await operator_query(request, ())
    hold = holder(request)
    rows = await run_in_threadpool(lambda: queue_rows(hold.get().ledger, hold.name))
    return JSONResponse({"queues": rows})


@guard
async def stats(request: Request) -> Response:
    """GET /api/stats?queue=Q"""
    _, name = await operator_query(request, ("queue",))
    hold = holder(request)
    return JSONResponse(await run_in_threadpool(lambda: jsonable(known_queue(hold, name).stats())))


@guard
async def runs(request: Request) -> Response:
    """GET /api/runs?queue=Q&limit=N&before_id=I"""
    params, name = await operator_query(request, ("queue", "limit", "before_id"))
    limit, before_id = page_query(params)
    hold = holder(request)

    def run() -> list[dict[str, Any]]:
        q = known_queue(hold, name)
        return [jsonable(r) for r in queue_runs(q.ledger, q.name, limit + 1, before_id)]

    rows = await run_in_threadpool(run)
    next_before = rows[limit - 1]["id"] if len(rows) > limit else None
    rows = rows[:limit]
    link = None
    if next_before is not None:
        link = "/api/runs?" + urlencode({**({"queue": name} if name else {}), "limit": limit, "before_id": next_before})
    return JSONResponse({"runs": rows, "next": link, "next_before_id": next_before})


ROUTES = [
    Route("/api/queues", queues, methods=["GET"]),
    Route("/api/stats", stats, methods=["GET"]),
    Route("/api/runs", runs, methods=["GET"]),
]

# --------------------------------------------------------------------------- OpenAPI
_QUEUE_PARAM = {"name": "queue", "in": "query", "schema": {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"},
                "description": "default: the served queue"}
_COUNT = {"type": "integer", "minimum": 0}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "QueueRow": {
        "type": "object",
        "required": ["queue", "counts", "total", "depth", "delayed", "oldest_due_age_s", "paused"],
        "properties": {
            "queue": {"type": "string"},
            "counts": {"type": "object", "required": list(STATUSES),
                       "properties": {s: _COUNT for s in STATUSES}, "additionalProperties": _COUNT},
            "total": _COUNT,
            "depth": {**_COUNT, "description": "pending jobs due now (waiting for a worker)"},
            "delayed": {**_COUNT, "description": "pending jobs not due yet (delays, retries' back-off)"},
            "oldest_due_age_s": {"type": ["number", "null"], "description": "how long the job due the longest has "
                                                                           "waited, seconds"},
            "paused": {"type": "boolean"},
        },
    },
    "QueueList": {"type": "object", "required": ["queues"],
                  "properties": {"queues": {"type": "array", "items": {"$ref": "#/components/schemas/QueueRow"}}}},
    "Stats": {"type": "object", "required": ["queue", "total", "success_rate"],
              "properties": {"queue": {"type": "string"}, "total": _COUNT,
                             "success_rate": {"type": ["number", "null"]},
                             "avg_exec_ms": {"type": ["number", "null"]},
                             "attempts": {"type": "object", "additionalProperties": _COUNT}}},
    "Run": {"type": "object", "required": ["id", "worker", "queue", "started_at", "status", "trigger"],
            "properties": {"id": {"type": "integer"}, "worker": {"type": "string"}, "queue": {"type": "string"},
                           "started_at": {"type": "string", "format": "date-time"},
                           "finished_at": {"type": ["string", "null"], "format": "date-time"},
                           "processed": _COUNT, "completed": _COUNT, "retried": _COUNT, "failed": _COUNT,
                           "released": _COUNT,
                           "trigger": {"type": "string"}, "params": {"type": ["object", "null"]},
                           "status": {"type": "string"}, "error": {"type": ["string", "null"]},
                           "run_id": {"type": ["string", "null"]}}},
    "RunList": {"type": "object", "required": ["runs", "next", "next_before_id"],
                "properties": {"runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
                               "next": {"type": ["string", "null"]},
                               "next_before_id": {"type": ["integer", "null"]}}},
}

_OPERATOR = [{"apiToken": []}]
_BAD_QUERY = error_response("A query parameter is invalid or unknown (named in `field`)")

OPENAPI_PATHS: dict[str, Any] = {
    "/api/queues": {"get": {
        "operationId": "listQueues", "summary": "Every queue the ledger knows, with counts, depth, oldest due "
                                                "job's age and paused flag (admins and readers)",
        "security": _OPERATOR,
        "responses": {"200": json_response("The queues, by name", "QueueList"), "422": _BAD_QUERY, **AUTH_ERRORS},
    }},
    "/api/stats": {"get": {
        "operationId": "queueStats", "summary": "One queue's statistics, as `qkit stats --json` (admins and readers)",
        "security": _OPERATOR, "parameters": [_QUEUE_PARAM],
        "responses": {"200": json_response("The statistics", "Stats"),
                      "404": error_response("No such queue in the ledger"), "422": _BAD_QUERY, **AUTH_ERRORS},
    }},
    "/api/runs": {"get": {
        "operationId": "listRuns", "summary": "Worker bursts of a queue, newest first (admins and readers)",
        "security": _OPERATOR,
        "parameters": [_QUEUE_PARAM,
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                   "maximum": MAX_LIST_LIMIT,
                                                                   "default": DEFAULT_LIST_LIMIT}},
                       {"name": "before_id", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                       "maximum": MAX_ID}}],
        "responses": {"200": json_response("A page of runs; `next` links the next page", "RunList"),
                      "404": error_response("No such queue in the ledger"), "422": _BAD_QUERY, **AUTH_ERRORS},
    }},
}

"""``GET /api/schedules?queue=Q``: a queue's recurring schedules and their next fire times (read only).

Admins and readers (:func:`qkit.api.roles.authorize` with ``operator``), as the other operator reads.
Payloads are left out (job data; ``qkit schedule list --json`` shows them to the operator's shell).
Schedules are made with ``q.schedule`` or ``qkit schedule add`` (docs/semantics.md#schedules).
"""
from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qkit.api.errors import guard
from qkit.api.holder import holder
from qkit.api.openapi import AUTH_ERRORS, error_response, json_response
from qkit.api.roles import operator_query
from qkit.api.routes_ops import known_queue
from qkit.model import jsonable

#: what a schedule row shows over HTTP (no payload)
FIELDS = ("name", "cron", "tz", "type", "priority", "max_attempts", "catch_up", "next_fire_at", "last_fire_at",
          "last_job_id", "created_at", "updated_at")


@guard
async def schedules(request: Request) -> Response:
    """GET /api/schedules?queue=Q"""
    _, name = await operator_query(request, ("queue",))
    hold = holder(request)

    def run() -> dict[str, Any]:
        q = known_queue(hold, name)
        return {"queue": q.name, "schedules": [jsonable({k: s[k] for k in FIELDS}) for s in q.schedules()]}

    return JSONResponse(await run_in_threadpool(run))


ROUTES = [Route("/api/schedules", schedules, methods=["GET"])]

# --------------------------------------------------------------------------- OpenAPI
_TIME = {"type": "string", "format": "date-time"}
OPENAPI_SCHEMAS: dict[str, Any] = {
    "Schedule": {
        "type": "object", "required": list(FIELDS),
        "properties": {
            "name": {"type": "string"}, "cron": {"type": "string"}, "tz": {"type": "string"},
            "type": {"type": "string"}, "priority": {"type": "integer"}, "max_attempts": {"type": "integer"},
            "catch_up": {"type": "string", "enum": ["latest", "all", "skip"]},
            "next_fire_at": {**_TIME, "description": "the first fire time not yet enqueued (UTC)"},
            "last_fire_at": {"type": ["string", "null"], "format": "date-time"},
            "last_job_id": {"type": ["integer", "null"]},
            "created_at": _TIME, "updated_at": _TIME,
        },
    },
    "ScheduleList": {"type": "object", "required": ["queue", "schedules"],
                     "properties": {"queue": {"type": "string"},
                                    "schedules": {"type": "array",
                                                  "items": {"$ref": "#/components/schemas/Schedule"}}}},
}

OPENAPI_PATHS: dict[str, Any] = {
    "/api/schedules": {"get": {
        "operationId": "listSchedules",
        "summary": "A queue's recurring schedules, soonest next fire first, without payloads (admins and readers)",
        "security": [{"apiToken": []}],
        "parameters": [{"name": "queue", "in": "query",
                        "schema": {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"},
                        "description": "default: the served queue"}],
        "responses": {"200": json_response("The schedules", "ScheduleList"),
                      "404": error_response("No such queue in the ledger"),
                      "422": error_response("A query parameter is invalid or unknown (named in `field`)"),
                      **AUTH_ERRORS},
    }},
}

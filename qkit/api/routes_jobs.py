"""The job routes: ``POST /api/jobs`` (enqueue), ``GET /api/jobs`` (list), ``GET /api/jobs/{id}``,
``POST /api/jobs/{id}/cancel``.

Who may do what is :mod:`qkit.api.roles`: admins everything, readers only the
reads, signed-in users (JWT) create jobs that record them as ``owner`` and
list, read and cancel only those (another user's job answers 404, as if it did
not exist).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qkit.api.bodies import (DEFAULT_LIST_LIMIT, JOB_FIELDS, MAX_BODY_BYTES, MAX_ID, MAX_LIST_LIMIT, is_id_text,
                             job_body, list_query, read_body)
from qkit.api.errors import ApiError, guard
from qkit.api.holder import holder
from qkit.api.openapi import AUTH_ERRORS, error_response, json_response
from qkit.api.roles import Caller, authorize
from qkit.errors import Conflict, NotFound
from qkit.model import STATUSES, jsonable
from qkit.text import clip

#: list rows carry at most this much of a job's error (the full text is on GET /api/jobs/{id})
LIST_ERROR_CHARS = 1000


def list_rows(q: Any, *, status: str | None, type: str | None, limit: int, before_id: int | None,
              owner: str | None = None) -> list[dict[str, Any]]:
    """Jobs of ``q``, newest first, without payload and result; ``error`` clipped to ``LIST_ERROR_CHARS``.

    ``owner``: only that user's jobs.
    """
    return [jsonable(r) for r in q.ledger.job_summaries(q.name, status=status, type=type, limit=limit,
                                                        before_id=before_id, error_chars=LIST_ERROR_CHARS,
                                                        owner=owner)]


def visible_job(q: Any, job_id: int, caller: Caller) -> Any:
    """Job ``job_id`` of ``q`` if ``caller`` may see it; else NotFound, worded as for a job that does not exist."""
    job = q.get(job_id)
    if not caller.sees(job.owner):
        raise NotFound(f"no job {job_id} in queue {q.name!r}")
    return job


def _path_id(request: Request) -> int:
    raw = request.path_params["id"]
    if not is_id_text(raw):
        raise ApiError(404, f"no job {clip(raw, 40)!r}")
    return int(raw)


# --------------------------------------------------------------------------- routes
@guard
async def enqueue(request: Request) -> Response:
    """POST /api/jobs: 201 for a new job; 200 with ``"duplicate": true`` when the idempotency key matched."""
    caller = await authorize(request, write=True)
    body = job_body(await read_body(request, MAX_BODY_BYTES))
    hold = holder(request)

    def run() -> tuple[dict[str, Any], bool]:
        q = hold.get()
        options = {k: body[k] for k in JOB_FIELDS[2:] if k in body}
        job_id, created = q.enqueue_result(body["type"], body["payload"], owner=caller.owner, **options)
        job = q.get(job_id)
        if not created and not caller.sees(job.owner):
            raise Conflict("key is held by a job you cannot see; choose another key")
        return {"id": job_id, "status": job.status}, created

    out, created = await run_in_threadpool(run)
    if not created:
        out["duplicate"] = True
    return JSONResponse(out, status_code=201 if created else 200, headers={"Location": f"/api/jobs/{out['id']}"})


@guard
async def list_jobs(request: Request) -> Response:
    """GET /api/jobs"""
    caller = await authorize(request)
    query = list_query(request.query_params)
    limit = query["limit"]
    hold = holder(request)
    rows = await run_in_threadpool(lambda: list_rows(hold.get(), status=query["status"], type=query["type"],
                                                     limit=limit + 1, before_id=query["before_id"],
                                                     owner=caller.owner))
    more = len(rows) > limit
    rows = rows[:limit]
    next_before = rows[-1]["id"] if more and rows else None
    next_link = None
    if next_before is not None:
        params = {k: v for k, v in query.items() if v is not None and k != "before_id"}
        next_link = "/api/jobs?" + urlencode({**params, "before_id": next_before})
    return JSONResponse({"jobs": rows, "next": next_link, "next_before_id": next_before})


async def jobs_route(request: Request) -> Response:
    """GET (and HEAD) /api/jobs lists; POST /api/jobs enqueues."""
    return await (enqueue(request) if request.method == "POST" else list_jobs(request))


@guard
async def get_job(request: Request) -> Response:
    """GET /api/jobs/{id}"""
    caller = await authorize(request)
    job_id = _path_id(request)
    hold = holder(request)

    def run() -> dict[str, Any]:
        q = hold.get()
        data = visible_job(q, job_id, caller).to_dict()
        data["attempts_detail"] = [{k: v for k, v in a.items() if k != "traceback"}
                                   for a in q.ledger.attempts(job_id)]
        return jsonable(data)

    return JSONResponse(await run_in_threadpool(run))


@guard
async def cancel_job(request: Request) -> Response:
    """POST /api/jobs/{id}/cancel: 200 ``{id, status}`` (``cancelled``, or ``processing`` with the cancel
    requested from its handler); 409 for a job already finished."""
    caller = await authorize(request, write=True)
    job_id = _path_id(request)
    hold = holder(request)

    def run() -> dict[str, Any]:
        q = hold.get()
        visible_job(q, job_id, caller)
        done = q.cancel(job_id)
        status = q.get(job_id).status
        if not done:
            raise Conflict(f"job {job_id} is {status}: only a pending or processing job can be cancelled")
        return {"id": job_id, "status": status}

    return JSONResponse(await run_in_threadpool(run))


ROUTES = [
    # one route per path, so a wrong method gets a 405 whose Allow header lists every method
    Route("/api/jobs", jobs_route, methods=["GET", "POST"]),
    Route("/api/jobs/{id}", get_job, methods=["GET"]),
    Route("/api/jobs/{id}/cancel", cancel_job, methods=["POST"]),
]

# --------------------------------------------------------------------------- OpenAPI
_ID_PARAM = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}]

OPENAPI_SCHEMAS: dict[str, Any] = {
    "Cancelled": {"type": "object", "required": ["id", "status"],
                  "properties": {"id": {"type": "integer"},
                                 "status": {"type": "string", "enum": list(STATUSES),
                                            "description": "the job's status just after: cancelled, or processing "
                                                           "until its handler returns"}}},
}

OPENAPI_PATHS: dict[str, Any] = {
    "/api/jobs": {
        "post": {
            "operationId": "enqueue", "summary": "Enqueue one job (recording the signed-in user as its owner)",
            "security": [{"apiToken": []}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/NewJob"}}}},
            "responses": {
                "201": json_response("Enqueued", "Created"),
                "200": json_response("The idempotency key matched this existing job (`duplicate` is true); "
                                     "nothing was created", "Created"),
                "400": error_response("Body is not a JSON object"),
                "408": error_response("Body too slow"),
                "409": error_response("The key is held by a job the signed-in user cannot see"),
                "413": error_response("Body or payload too large"),
                "422": error_response("A field is invalid (named in `field`)"),
                **AUTH_ERRORS,
            },
        },
        "get": {
            "operationId": "listJobs", "summary": "List jobs, newest first (a user's own only)",
            "security": [{"apiToken": []}],
            "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATUSES)}},
                {"name": "type", "in": "query", "schema": {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"}},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                            "default": DEFAULT_LIST_LIMIT}},
                {"name": "before_id", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
            ],
            "responses": {
                "200": json_response("A page of jobs (payload and result omitted); `next` links the next page",
                                     "JobList"),
                "422": error_response("A query parameter is invalid (named in `field`)"),
                **AUTH_ERRORS,
            },
        },
    },
    "/api/jobs/{id}": {
        "get": {
            "operationId": "getJob", "summary": "One job with its attempts",
            "security": [{"apiToken": []}],
            "parameters": _ID_PARAM,
            "responses": {
                "200": json_response("The job", "Job"),
                "404": error_response("No such job in this queue (or another user's)"),
                **AUTH_ERRORS,
            },
        },
    },
    "/api/jobs/{id}/cancel": {
        "post": {
            "operationId": "cancelJob",
            "summary": "Cancel a pending or delayed job; ask a running job's handler to stop",
            "security": [{"apiToken": []}],
            "parameters": _ID_PARAM,
            "responses": {
                "200": json_response("Cancelled (`cancelled`), or the cancel was requested from the running "
                                     "handler (`processing`)", "Cancelled"),
                "404": error_response("No such job in this queue (or another user's)"),
                "409": error_response("The job already finished"),
                **AUTH_ERRORS,
            },
        },
    },
}

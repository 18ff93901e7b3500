"""The API's routes and the app that assembles them for one queue (:func:`create_app`).

Each route is a module-level endpoint: it checks who calls (:mod:`qkit.api.auth`),
reads what they send (:mod:`qkit.api.bodies`), does the work on a thread (the
queue is synchronous) and answers JSON; every failure becomes one JSON line
through :func:`qkit.api.errors.guard`.  The app's state holds the queue
(opened on first use), the burst caps and the burst limiter.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Any, AsyncIterator
from urllib.parse import urlencode

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qkit.accesslog import AccessLog
from qkit.api.auth import authorize_burst, require_api_token
from qkit.api.bodies import (JOB_FIELDS, MAX_BODY_BYTES, api_limits, burst_budget, is_id_text, job_body,
                             list_query, read_body)
from qkit.api.errors import ApiError, guard, http_error, route_of
from qkit.api.openapi import OPENAPI
from qkit.config import DEFAULT_QUEUE, Settings, settings as resolve_settings
from qkit.errors import BadInput
from qkit.model import check_name, jsonable
from qkit.text import clip

log = logging.getLogger("qkit.api")

#: list rows carry at most this much of a job's error (the full text is on GET /api/jobs/{id})
LIST_ERROR_CHARS = 1000
#: bursts run on their own thread limiter, so long bursts never starve the job routes
MAX_CONCURRENT_BURSTS = 4


class QueueHolder:
    """Opens the queue on first use (and again after a failed open), once, across threads."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self._queue: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    from qkit.engine.queue import Queue

                    self._queue = Queue(self.name, self.settings)
        return self._queue

    def discard(self) -> None:
        """Forget the queue after a backend failure; the next :meth:`get` opens a new one.

        Not closed here: a burst in another thread may still be using it (and
        may well succeed); its connections go with the last reference.
        """
        with self._lock:
            self._queue = None

    def close(self) -> None:
        with self._lock:
            if self._queue is not None:
                self._queue.close()
                self._queue = None


def _holder(request: Request) -> QueueHolder:
    return request.app.state.queue


def list_rows(q: Any, *, status: str | None, type: str | None, limit: int,
              before_id: int | None) -> list[dict[str, Any]]:
    """Jobs of ``q``, newest first, without payload and result; ``error`` clipped to ``LIST_ERROR_CHARS``."""
    return [jsonable(r) for r in q.ledger.job_summaries(q.name, status=status, type=type, limit=limit,
                                                        before_id=before_id, error_chars=LIST_ERROR_CHARS)]


# --------------------------------------------------------------------------- routes
@guard
async def enqueue(request: Request) -> Response:
    """POST /api/jobs"""
    require_api_token(request)
    body = job_body(await read_body(request, MAX_BODY_BYTES))
    holder = _holder(request)

    def run() -> dict[str, Any]:
        q = holder.get()
        job_id = q.enqueue(body["type"], body["payload"], **{k: body[k] for k in JOB_FIELDS[2:] if k in body})
        return {"id": job_id, "status": q.get(job_id).status}

    out = await run_in_threadpool(run)
    return JSONResponse(out, status_code=201, headers={"Location": f"/api/jobs/{out['id']}"})


@guard
async def list_jobs(request: Request) -> Response:
    """GET /api/jobs"""
    require_api_token(request)
    query = list_query(request.query_params)
    limit = query["limit"]
    holder = _holder(request)
    rows = await run_in_threadpool(lambda: list_rows(holder.get(), status=query["status"], type=query["type"],
                                                     limit=limit + 1, before_id=query["before_id"]))
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
    require_api_token(request)
    raw = request.path_params["id"]
    if not is_id_text(raw):
        raise ApiError(404, f"no job {clip(raw, 40)!r}")
    job_id = int(raw)
    holder = _holder(request)

    def run() -> dict[str, Any]:
        q = holder.get()
        data = q.get(job_id).to_dict()
        data["attempts_detail"] = [{k: v for k, v in a.items() if k != "traceback"}
                                   for a in q.ledger.attempts(job_id)]
        return jsonable(data)

    return JSONResponse(await run_in_threadpool(run))


@guard
async def work(request: Request) -> Response:
    """POST /api/workers"""
    via, raw = await authorize_burst(request)
    budget = burst_budget(raw, request.app.state.limits)
    holder = _holder(request)

    def run() -> dict[str, Any]:
        summary = holder.get().work(trigger="http", params={"via": via}, **budget)
        return {**summary.to_dict(), **budget}

    out = await anyio.to_thread.run_sync(run, limiter=request.app.state.burst_limiter)
    return JSONResponse(out)


@guard
async def health(request: Request) -> Response:
    """GET /api/health"""
    holder = _holder(request)

    def run() -> dict[str, str]:
        checks = {"redis": "unknown", "ledger": "unknown"}
        try:
            q = holder.get()
        except Exception as exc:  # noqa: BLE001 - any failure to open is "unknown", logged redacted
            log.error("health: cannot open the queue: %s: %s", type(exc).__name__, exc)
            return checks
        for name, ping in (("redis", q.backend.ping), ("ledger", q.ledger.ping)):
            try:
                ping()
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported as a status, logged redacted
                log.error("health: %s: %s", name, exc)
                checks[name] = "unavailable"
        if "unavailable" in checks.values():
            holder.discard()  # reconnect (and restart an embedded Redis) on the next request
        return checks

    checks = await run_in_threadpool(run)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503, headers={"Cache-Control": "no-store"})


async def openapi(request: Request) -> Response:
    """GET /api/openapi.json"""
    return JSONResponse(OPENAPI)


ROUTES = [
    # one route per path, so a wrong method gets a 405 whose Allow header lists every method
    Route("/api/jobs", jobs_route, methods=["GET", "POST"]),
    Route("/api/jobs/{id}", get_job, methods=["GET"]),
    Route("/api/workers", work, methods=["POST"]),
    Route("/api/health", health, methods=["GET"]),
    Route("/api/openapi.json", openapi, methods=["GET"]),
]


# --------------------------------------------------------------------------- the app
@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    holder: QueueHolder = app.state.queue
    try:
        await run_in_threadpool(holder.get)  # start/attach the embedded Redis before the first request
    except Exception as exc:  # noqa: BLE001 - serve anyway: health reports it, requests retry the open
        log.error("queue %r is not available yet (health answers 503 until it is): %s: %s",
                  holder.name, type(exc).__name__, exc)
    yield
    await run_in_threadpool(holder.close)


def create_app(queue: str = DEFAULT_QUEUE, **connect_overrides: Any) -> Starlette:
    """Build the API app for one queue.

    ``connect_overrides`` are :func:`qkit.connect`'s keyword arguments
    (``home=``, ``redis_url=``, ``database_url=`` ...).  Settings and limits
    are resolved now (a bad value raises ConfigError here); the queue itself
    (and so the embedded Redis) is opened at start-up, and again on the next
    request if that failed.  ``app.state.limits`` holds the burst caps.
    """
    check_name(queue, "queue name")
    unknown = set(connect_overrides) - set(inspect.signature(resolve_settings).parameters)
    if unknown:
        raise BadInput(f"unknown option(s) for create_app: {', '.join(sorted(unknown))}")
    holder = QueueHolder(queue, resolve_settings(**connect_overrides))
    limits = api_limits()
    app = Starlette(routes=ROUTES, middleware=[Middleware(AccessLog, logger=log, route_of=route_of)],
                    exception_handlers={HTTPException: http_error}, lifespan=_lifespan)
    app.state.limits = limits
    app.state.queue = holder
    app.state.burst_limiter = anyio.CapacityLimiter(MAX_CONCURRENT_BURSTS)
    return app

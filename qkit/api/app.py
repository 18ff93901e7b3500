"""The API's core routes, the route groups (:data:`ROUTE_MODULES`) and the app that assembles them for one
queue (:func:`create_app`).

Each route is a module-level endpoint: it checks who calls (:mod:`qkit.api.roles`),
reads what they send (:mod:`qkit.api.bodies`), does the work on a thread (the
queue is synchronous) and answers JSON; every failure becomes one JSON line
through :func:`qkit.api.errors.guard`.  The app's state holds the queue
(opened on first use), the burst caps and the burst limiter.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, AsyncIterator

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
from qkit.api.auth import authorize_burst
from qkit.api.bodies import api_limits, burst_budget
from qkit.api.errors import guard, http_error, route_templates
from qkit.api.holder import QueueHolder, holder as _holder
from qkit.api.openapi import document
from qkit.api import (dashboard, metrics, routes_dlq, routes_jobs, routes_ops,  # the route groups (ROUTE_MODULES)
                      routes_schedules)
from qkit.config import DEFAULT_QUEUE, settings as resolve_settings
from qkit.errors import BadInput
from qkit.model import check_name

log = logging.getLogger("qkit.api")

#: bursts run on their own thread limiter, so long bursts never starve the job routes
MAX_CONCURRENT_BURSTS = 4

#: The route groups, in order: each module holds ``ROUTES`` (Starlette routes) and, for JSON routes,
#: ``OPENAPI_PATHS`` / ``OPENAPI_SCHEMAS``.  A new group is its module named in the import above and here.
ROUTE_MODULES = (routes_jobs, routes_ops, routes_dlq, metrics, routes_schedules, dashboard)


# --------------------------------------------------------------------------- routes
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


CORE_ROUTES = [
    Route("/api/workers", work, methods=["POST"]),
    Route("/api/health", health, methods=["GET"]),
    Route("/api/openapi.json", openapi, methods=["GET"]),
]


def all_routes() -> list[Any]:
    """The core routes, then each route group's, in order."""
    return CORE_ROUTES + [route for module in ROUTE_MODULES for route in module.ROUTES]


#: the OpenAPI document of the core routes and every route group
OPENAPI = document(ROUTE_MODULES)


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
    routes = all_routes()
    app = Starlette(routes=routes, middleware=[Middleware(AccessLog, logger=log, route_of=route_templates(routes))],
                    exception_handlers={HTTPException: http_error}, lifespan=_lifespan)
    app.state.limits = limits
    app.state.queue = holder
    app.state.burst_limiter = anyio.CapacityLimiter(MAX_CONCURRENT_BURSTS)
    return app

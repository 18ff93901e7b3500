"""How the API answers a failed request: :class:`ApiError`, the endpoint guard, and route names for logs.

Every refusal is one JSON object ``{"error": ..., "field"?: ...}`` with the
message clipped and redacted; failures of the backend are 503 and are logged
with the route *template*, never the raw path (it could carry anything).
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Awaitable, Callable, Iterable, Mapping

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from qkit.config import redact
from qkit.errors import BackendUnavailable, BadInput, Conflict, NotFound, QkitError
from qkit.text import clip

log = logging.getLogger("qkit.api")

#: error messages echoed to clients are clipped (they may quote the offending value)
MAX_MESSAGE_CHARS = 500
UNAVAILABLE = "backend unavailable: Redis or the ledger cannot be reached (details are in the server log)"

Endpoint = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    """An answer other than success: status, one-line message, and the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": clip(redact(self.message), MAX_MESSAGE_CHARS)}
        if self.field is not None:
            body["field"] = self.field
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def route_of(request: Request) -> str:
    """The route template of a request (``/api/jobs/{id}``); never the raw path (it could carry anything)."""
    return getattr(request.scope.get("route"), "path", None) or "<other>"


def route_templates(routes: Iterable[Any]) -> Callable[[str], str]:
    """For the access log: a path's route template among ``routes``, or ``<other>``."""
    patterns = [(route.path_regex, route.path) for route in routes if hasattr(route, "path_regex")]

    def template(path: str) -> str:
        return next((name for regex, name in patterns if regex.match(path)), "<other>")

    return template


def guard(fn: Endpoint) -> Endpoint:
    """Turn every failure of an endpoint into a one-line JSON answer.

    Catching here (not in Starlette's ServerErrorMiddleware) matters: that
    middleware re-raises after answering, and uvicorn would then log a full
    traceback whose exception text we do not control.  After a
    BackendUnavailable the app's queue is dropped (``app.state.queue``), so the
    next request opens a fresh one, restarting an embedded Redis that died.
    """

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as exc:
            return exc.response()
        except BackendUnavailable as exc:
            log.error("%s %s: %s", request.method, route_of(request), exc)
            holder = getattr(request.app.state, "queue", None)
            if holder is not None:
                holder.discard()
            return ApiError(503, UNAVAILABLE).response()
        except NotFound as exc:
            return ApiError(404, str(exc)).response()
        except Conflict as exc:  # valid, but not in the job's current state
            return ApiError(409, str(exc)).response()
        except BadInput as exc:  # validation the route did not attribute to a field
            return ApiError(422, str(exc)).response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; keep the log quiet
        except QkitError as exc:
            log.error("%s %s: %s: %s", request.method, route_of(request), type(exc).__name__, exc)
            return ApiError(500, "server error (details are in the server log)").response()
        except Exception:  # noqa: BLE001 - a bug: one redacted log entry, a generic answer
            log.error("%s %s failed:\n%s", request.method, route_of(request), traceback.format_exc())
            return ApiError(500, "internal server error").response()

    endpoint.__name__ = fn.__name__
    endpoint.__doc__ = fn.__doc__
    return endpoint


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 unknown path, 405 wrong method) as JSON ``{"error": detail}``."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    return JSONResponse({"error": str(detail)}, status_code=status, headers=getattr(exc, "headers", None))

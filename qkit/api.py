"""The HTTP API (SPEC §8), served by ``qkit serve``: closed by default.

Routes (all JSON):

============================  =============================  ==========================================
route                         auth                           does
============================  =============================  ==========================================
``POST /api/jobs``            ``Bearer $QKIT_API_TOKEN``     enqueue; 201 ``{id, status}``
``GET /api/jobs``             same                           list, newest first, ``before_id`` paging
``GET /api/jobs/{id}``        same                           one job with its attempts; 404 if none
``POST /api/workers``         ``Bearer $WORKER_SECRET`` or   one burst; 200 summary (also when jobs
                              a QStash ``Upstash-Signature``  failed); 503 only for infrastructure
``GET /api/health``           none                           backend reachability, nothing else
``GET /api/openapi.json``     none                           the OpenAPI 3.1 document
============================  =============================  ==========================================

Security decisions (each one is deliberate and tested in ``tests/test_api.py``):

* **Fail closed.**  A secret that is unset, empty or only whitespace disables
  its routes: they answer 503 whatever the request carries.  ``/api/workers``
  is enabled by ``WORKER_SECRET`` or by QStash signing keys.
* **When secrets are read.**  ``QKIT_API_TOKEN``, ``WORKER_SECRET``,
  ``QSTASH_CURRENT_SIGNING_KEY``, ``QSTASH_NEXT_SIGNING_KEY`` and
  ``QKIT_API_PUBLIC_URL`` are read from the environment *at request time*
  (never cached in the app); the limits ``QKIT_API_MAX_SECONDS`` and
  ``QKIT_API_MAX_JOBS`` are read *once, at app creation*, so a malformed value
  stops ``qkit serve`` at start with one line naming the variable.
* **Bearer parsing** (RFC 6750 / RFC 7235): exactly one ``Authorization``
  header; the scheme ``Bearer`` is matched case-insensitively (``bearer`` works);
  one or more spaces may separate it from the token, and spaces around the
  token are ignored (HTTP strips them anyway).  The configured secret is
  stripped the same way.  Tokens are compared as raw header **bytes** with
  :func:`hmac.compare_digest` over their SHA-256 digests (constant time, no
  length leak), so a non-ASCII token is a plain mismatch: 401, never 500.
  Tokens are never accepted in the query string, and the two secrets are not
  interchangeable.
* **QStash**: ``Upstash-Signature`` is a HS256 JWT; issuer ``Upstash``; ``sub``
  must equal this endpoint's URL (``QKIT_API_PUBLIC_URL`` + path when set,
  e.g. behind a proxy, else the URL the request arrived on); ``exp``/``nbf``
  with a 10 s clock tolerance; claim ``body`` = base64url(SHA-256(raw body)).
  Tried with the current key, then the next one.  ``jti`` is not cached: a
  burst is safe to replay.
* **Limits**: request bodies are read with a cap (300 KiB for jobs, 16 KiB for
  workers): a declared ``Content-Length`` over the cap is refused (413) before
  reading, and a chunked body is counted while it streams and refused as soon
  as it passes the cap.  A payload over 256 KiB of compact JSON is a 413 too.
  JSON nesting is capped at 64 levels.  A burst's ``max_seconds`` and
  ``max_jobs`` are clamped to the server's caps.
* **Logs**: uvicorn's access log is off; :class:`qkit.accesslog.AccessLog` writes method,
  route template, status and time, never headers, query strings or bodies.
  Every log record passes through :func:`qkit.config.redact`.  Error
  responses never carry URLs, versions or configuration.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import re
import threading
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from urllib.parse import urlencode

import anyio
import anyio.to_thread
import jwt
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from qkit.accesslog import AccessLog
from qkit.config import DEFAULT_QUEUE, Settings, redact, settings as resolve_settings
from qkit.errors import BackendUnavailable, BadInput, ConfigError, NotFound, QkitError
from qkit.model import MAX_PAYLOAD_BYTES, NAME_RE, STATUSES, check_name, compact_json, new_job

log = logging.getLogger("qkit.api")

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
#: list rows carry at most this much of a job's error (the full text is on GET /api/jobs/{id})
LIST_ERROR_CHARS = 1000
#: error messages echoed to clients are clipped (they may quote the offending value)
MAX_MESSAGE_CHARS = 500
QSTASH_CLOCK_TOLERANCE = 10
#: bursts run on their own thread limiter, so long bursts never starve the job routes
MAX_CONCURRENT_BURSTS = 4
DEFAULT_API_MAX_SECONDS = 25.0
DEFAULT_API_MAX_JOBS = 1000

JOB_FIELDS = ("type", "payload", "priority", "max_attempts", "delay", "key")
WORKER_FIELDS = ("max_jobs", "max_seconds")
LIST_PARAMS = ("status", "type", "limit", "before_id")
_DIGITS = re.compile(r"[0-9]{1,20}")


# --------------------------------------------------------------------------- errors
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
        body: dict[str, Any] = {"error": _clip(redact(self.message))}
        if self.field is not None:
            body["field"] = self.field
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


UNAVAILABLE = "backend unavailable: Redis or the ledger cannot be reached (details are in the server log)"


def _guard(fn: Callable[[Request], Awaitable[Response]], *,
           on_unavailable: Callable[[], None] | None = None) -> Callable[[Request], Awaitable[Response]]:
    """Turn every failure of an endpoint into a one-line JSON answer.

    Catching here (not in Starlette's ServerErrorMiddleware) matters: that
    middleware re-raises after answering, and uvicorn would then log a full
    traceback whose exception text we do not control.  ``on_unavailable``
    runs after a BackendUnavailable (the app drops its queue so the next
    request opens a fresh one, restarting an embedded Redis that died).
    """

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as exc:
            return exc.response()
        except BackendUnavailable as exc:
            log.error("%s %s: %s", request.method, _route_of(request.url.path), exc)
            if on_unavailable is not None:
                on_unavailable()
            return ApiError(503, UNAVAILABLE).response()
        except NotFound as exc:
            return ApiError(404, str(exc)).response()
        except BadInput as exc:  # validation the route did not attribute to a field
            return ApiError(422, str(exc)).response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; keep the log quiet
        except QkitError as exc:
            log.error("%s %s: %s: %s", request.method, _route_of(request.url.path), type(exc).__name__, exc)
            return ApiError(500, "server error (details are in the server log)").response()
        except Exception:  # noqa: BLE001 - a bug: one redacted log entry, a generic answer
            log.error("%s %s failed:\n%s", request.method, _route_of(request.url.path), traceback.format_exc())
            return ApiError(500, "internal server error").response()

    endpoint.__name__ = fn.__name__
    endpoint.__doc__ = fn.__doc__
    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path, wrong method) as JSON."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    return JSONResponse({"error": str(detail)}, status_code=status, headers=getattr(exc, "headers", None))


# --------------------------------------------------------------------------- auth
def _secret(name: str) -> bytes | None:
    """A secret from the environment (read now), stripped; None when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value.encode("utf-8") if value else None


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's single ``Authorization: Bearer`` header, as raw bytes.

    None when there is no such header, more than one, another scheme, or no token.
    """
    values = [value for name, value in scope.get("headers", []) if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    parts = values[0].strip(b" \t").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    return parts[1].strip(b" \t") or None


def token_matches(presented: bytes | None, expected: bytes) -> bool:
    """Constant-time comparison of raw bytes (via SHA-256, so lengths do not leak)."""
    given = hashlib.sha256(presented if presented is not None else b"").digest()
    same = hmac.compare_digest(given, hashlib.sha256(expected).digest())
    return presented is not None and same


def verify_qstash_signature(signature: str, body: bytes, url: str, keys: Sequence[str], *,
                            leeway: float = QSTASH_CLOCK_TOLERANCE) -> bool:
    """True when ``signature`` is a QStash JWT for this ``url`` and these exact body bytes.

    Each key is tried in order (current, then next: that is how QStash rotates
    keys).  Requires ``iss == "Upstash"``, ``sub``, ``exp``, ``nbf`` and ``body``.
    """
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=")
    for key in keys:
        try:
            claims = jwt.decode(signature, key, algorithms=["HS256"], issuer="Upstash", leeway=leeway,
                                options={"require": ["iss", "sub", "exp", "nbf", "body"]})
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        sub, claimed = claims.get("sub"), claims.get("body")
        if not isinstance(sub, str) or not isinstance(claimed, str):
            continue
        if sub.rstrip("/") != url.rstrip("/"):
            continue
        if hmac.compare_digest(claimed.rstrip("=").encode("utf-8"), digest):
            return True
    return False


def endpoint_url(request: Request) -> str:
    """The URL QStash was told to call: ``QKIT_API_PUBLIC_URL`` + path, or the request's own URL."""
    base = os.environ.get("QKIT_API_PUBLIC_URL", "").strip().rstrip("/")
    url = base + request.url.path if base else f"{request.url.scheme}://{request.url.netloc}{request.url.path}"
    return f"{url}?{request.url.query}" if request.url.query else url


def _unauthorized() -> ApiError:
    return ApiError(401, "missing or invalid credentials", headers={"WWW-Authenticate": 'Bearer realm="qkit"'})


def require_api_token(request: Request) -> None:
    """``/api/jobs*``: ``Bearer $QKIT_API_TOKEN``; 503 when it is not set, 401 when wrong."""
    expected = _secret("QKIT_API_TOKEN")
    if expected is None:
        raise ApiError(503, "QKIT_API_TOKEN is not set on the server: the /api/jobs routes are disabled")
    if not token_matches(bearer_token(request.scope), expected):
        raise _unauthorized()


# --------------------------------------------------------------------------- bodies
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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


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
        value = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
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


# --------------------------------------------------------------------------- settings
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
                    from qkit.queue import Queue

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


# --------------------------------------------------------------------------- JSON helpers
def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _field_of_job_error(body: Mapping[str, Any]) -> None:
    """Validate each enqueue field on its own, so a refusal names the field at fault."""
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


def _parse_list_query(request: Request) -> dict[str, Any]:
    params = request.query_params
    out: dict[str, Any] = {"status": None, "type": None, "limit": DEFAULT_LIST_LIMIT, "before_id": None}
    for name in params.keys():
        if name not in LIST_PARAMS:
            raise ApiError(422, f"unknown query parameter {name!r} (allowed: {', '.join(LIST_PARAMS)})",
                           field=name)
        if len(params.getlist(name)) > 1:
            raise ApiError(422, f"query parameter {name!r} is given more than once", field=name)
    if "status" in params:
        if params["status"] not in STATUSES:
            raise ApiError(422, f"status must be one of {', '.join(STATUSES)}", field="status")
        out["status"] = params["status"]
    if "type" in params:
        if not NAME_RE.fullmatch(params["type"]):
            raise ApiError(422, "type must be 1-64 characters of a-z, 0-9, '_', '.', '-'", field="type")
        out["type"] = params["type"]
    if "limit" in params:
        raw = params["limit"]
        if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
            raise ApiError(422, f"limit must be an integer 1..{MAX_LIST_LIMIT}", field="limit")
        out["limit"] = int(raw)
    if "before_id" in params:
        raw = params["before_id"]
        if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_ID:
            raise ApiError(422, f"before_id must be an integer 1..{MAX_ID}", field="before_id")
        out["before_id"] = int(raw)
    return out


def list_rows(q: Any, *, status: str | None, type: str | None, limit: int,
              before_id: int | None) -> list[dict[str, Any]]:
    """Jobs of ``q``, newest first, without payload and result; ``error`` clipped to ``LIST_ERROR_CHARS``."""
    return [_jsonable(r) for r in q.ledger.job_summaries(q.name, status=status, type=type, limit=limit,
                                                         before_id=before_id, error_chars=LIST_ERROR_CHARS)]


# --------------------------------------------------------------------------- access log
KNOWN_ROUTES = ("/api/jobs", "/api/workers", "/api/health", "/api/openapi.json")
_JOB_PATH = re.compile(r"/api/jobs/[^/]+")


def _route_of(path: str) -> str:
    """The route template of a path; never the raw path (it could carry anything)."""
    if path in KNOWN_ROUTES:
        return path
    return "/api/jobs/{id}" if _JOB_PATH.fullmatch(path) else "<other>"


# --------------------------------------------------------------------------- the app
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
    burst_limiter = anyio.CapacityLimiter(MAX_CONCURRENT_BURSTS)

    def guard(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        return _guard(fn, on_unavailable=holder.discard)

    @guard
    async def enqueue(request: Request) -> Response:
        """POST /api/jobs"""
        require_api_token(request)
        body = parse_object(await read_body(request, MAX_BODY_BYTES))
        _refuse_unknown(body, JOB_FIELDS)
        _integral(body, ("priority", "max_attempts"))
        _refuse_huge(body, ("priority", "max_attempts", "delay"))
        _field_of_job_error(body)

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
        query = _parse_list_query(request)
        limit = query["limit"]
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
        if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_ID:
            raise ApiError(404, f"no job {_clip(raw, 40)!r}")
        job_id = int(raw)

        def run() -> dict[str, Any]:
            q = holder.get()
            data = q.get(job_id).to_dict()
            data["attempts_detail"] = [{k: v for k, v in a.items() if k != "traceback"}
                                       for a in q.ledger.attempts(job_id)]
            return _jsonable(data)

        return JSONResponse(await run_in_threadpool(run))

    @guard
    async def work(request: Request) -> Response:
        """POST /api/workers"""
        secret = _secret("WORKER_SECRET")
        keys = [k for k in (os.environ.get("QSTASH_CURRENT_SIGNING_KEY", "").strip(),
                            os.environ.get("QSTASH_NEXT_SIGNING_KEY", "").strip()) if k]
        if secret is None and not keys:
            raise ApiError(503, "WORKER_SECRET is not set on the server (nor QStash signing keys): "
                                "/api/workers is disabled")
        raw: bytes | None = None
        via = None
        if secret is not None and token_matches(bearer_token(request.scope), secret):
            via = "bearer"
        elif keys and "upstash-signature" in request.headers:
            # the signature covers the raw body, so it must be read (within its cap) first
            raw = await read_body(request, MAX_WORKER_BODY_BYTES)
            if verify_qstash_signature(request.headers["upstash-signature"], raw, endpoint_url(request), keys):
                via = "qstash"
        if via is None:
            raise _unauthorized()
        if raw is None:
            raw = await read_body(request, MAX_WORKER_BODY_BYTES)
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
        budget = {"max_jobs": min(max_jobs, limits.max_jobs),
                  "max_seconds": float(min(max_seconds, limits.max_seconds))}

        def run() -> dict[str, Any]:
            summary = holder.get().work(trigger="http", params={"via": via}, **budget)
            return {**summary.to_dict(), **budget}

        out = await anyio.to_thread.run_sync(run, limiter=burst_limiter)
        return JSONResponse(out)

    @guard
    async def health(request: Request) -> Response:
        """GET /api/health"""

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

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(holder.get)  # start/attach the embedded Redis before the first request
        except Exception as exc:  # noqa: BLE001 - serve anyway: health reports it, requests retry the open
            log.error("queue %r is not available yet (health answers 503 until it is): %s: %s",
                      queue, type(exc).__name__, exc)
        yield
        await run_in_threadpool(holder.close)

    routes = [
        # one route per path, so a wrong method gets a 405 whose Allow header lists every method
        Route("/api/jobs", jobs_route, methods=["GET", "POST"]),
        Route("/api/jobs/{id}", get_job, methods=["GET"]),
        Route("/api/workers", work, methods=["POST"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(AccessLog, logger=log, route_of=_route_of)],
                    exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
    app.state.limits = limits
    app.state.queue = holder
    return app


# --------------------------------------------------------------------------- serving
class RedactFilter(logging.Filter):
    """Pass every log record (message and traceback) through :func:`qkit.config.redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def serve(host: str = "127.0.0.1", port: int = 8000, queue: str = DEFAULT_QUEUE) -> None:
    """Serve the API with uvicorn in the foreground until interrupted (``qkit serve``)."""
    import uvicorn

    app = create_app(queue)  # ConfigError here: one line from the CLI, nothing served
    _configure_logging()
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the API is reachable from other hosts; use TLS in front of it", host)
    for variable, routes in (("QKIT_API_TOKEN", "/api/jobs*"), ("WORKER_SECRET", "/api/workers")):
        if _secret(variable) is None and not (variable == "WORKER_SECRET" and (
                os.environ.get("QSTASH_CURRENT_SIGNING_KEY", "").strip()
                or os.environ.get("QSTASH_NEXT_SIGNING_KEY", "").strip())):
            log.warning("%s is not set: %s answers 503", variable, routes)
    limits: ApiLimits = app.state.limits
    log.info("qkit API for queue %r on http://%s:%d (bursts capped at %g s / %d jobs)",
             queue, host, port, limits.max_seconds, limits.max_jobs)
    # log_config=None: keep the logging set up above (with RedactFilter) for uvicorn's loggers too;
    # access_log=False: AccessLog replaces it (uvicorn's prints query strings);
    # server_header=False: the API reveals no server software.
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False,
                lifespan="on")


# --------------------------------------------------------------------------- OpenAPI
def _error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_JOB_PROPS: dict[str, Any] = {
    "id": {"type": "integer"},
    "queue": {"type": "string"},
    "type": {"type": "string"},
    "status": {"type": "string", "enum": list(STATUSES)},
    "priority": {"type": "integer"},
    "attempts": {"type": "integer"},
    "max_attempts": {"type": "integer"},
    "error": {"type": ["string", "null"]},
    "idempotency_key": {"type": ["string", "null"]},
    "run_at": {"type": ["string", "null"], "format": "date-time"},
    "created_at": {"type": ["string", "null"], "format": "date-time"},
    "updated_at": {"type": ["string", "null"], "format": "date-time"},
    "started_at": {"type": ["string", "null"], "format": "date-time"},
    "finished_at": {"type": ["string", "null"], "format": "date-time"},
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "qkit HTTP API", "version": "1",
             "description": "Enqueue and inspect jobs, and trigger worker bursts (SPEC §8)."},
    "components": {
        "securitySchemes": {
            "apiToken": {"type": "http", "scheme": "bearer", "description": "QKIT_API_TOKEN"},
            "workerSecret": {"type": "http", "scheme": "bearer", "description": "WORKER_SECRET"},
            "qstashSignature": {"type": "apiKey", "in": "header", "name": "Upstash-Signature",
                                "description": "A QStash-signed request (when QStash signing keys are set)"},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}, "field": {"type": "string"}}},
            "NewJob": {
                "type": "object", "required": ["type", "payload"], "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"},
                    "payload": {"type": "object", "description": "at most 256 KiB of compact UTF-8 JSON"},
                    "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000, "default": 0},
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
                    "delay": {"type": "number", "minimum": 0, "maximum": 366 * 24 * 3600, "default": 0},
                    "key": {"type": ["string", "null"], "minLength": 1, "maxLength": 256},
                },
            },
            "Created": {"type": "object", "required": ["id", "status"],
                        "properties": {"id": {"type": "integer"},
                                       "status": {"type": "string", "enum": list(STATUSES)}}},
            "JobRow": {"type": "object", "required": ["id", "queue", "type", "status"], "properties": _JOB_PROPS},
            "JobList": {"type": "object", "required": ["jobs", "next", "next_before_id"],
                        "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobRow"}},
                                       "next": {"type": ["string", "null"]},
                                       "next_before_id": {"type": ["integer", "null"]}}},
            "Job": {"type": "object", "required": ["id", "queue", "type", "status", "payload"],
                    "properties": {**_JOB_PROPS, "payload": {"type": "object"}, "result": {},
                                   "epoch": {"type": "integer"},
                                   "attempts_detail": {"type": "array", "items": {"type": "object"}}}},
            "BurstRequest": {
                "type": "object", "additionalProperties": False,
                "properties": {"max_jobs": {"type": "integer", "minimum": 1},
                               "max_seconds": {"type": "number", "exclusiveMinimum": 0}},
            },
            "BurstSummary": {
                "type": "object",
                "required": ["worker", "processed", "completed", "retried", "failed", "max_jobs", "max_seconds"],
                "properties": {"worker": {"type": "string"}, "run_id": {"type": ["integer", "null"]},
                               "processed": {"type": "integer"}, "completed": {"type": "integer"},
                               "retried": {"type": "integer"}, "failed": {"type": "integer"},
                               "lost": {"type": "integer"}, "fenced": {"type": "integer"},
                               "seconds": {"type": "number"}, "stopped_by": {"type": "string"},
                               "errors": {"type": "array", "items": {"type": "string"}},
                               "max_jobs": {"type": "integer"}, "max_seconds": {"type": "number"}},
            },
            "Health": {"type": "object", "required": ["status", "checks"],
                       "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]},
                                      "checks": {"type": "object",
                                                 "additionalProperties": {"type": "string"}}}},
        },
    },
    "paths": {
        "/api/jobs": {
            "post": {
                "operationId": "enqueue", "summary": "Enqueue one job",
                "security": [{"apiToken": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/NewJob"}}}},
                "responses": {
                    "201": {"description": "Enqueued (or the existing job holding the idempotency key)",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Created"}}}},
                    "400": _error_response("Body is not a JSON object"),
                    "401": _error_response("Missing or invalid token"),
                    "408": _error_response("Body too slow"),
                    "413": _error_response("Body or payload too large"),
                    "422": _error_response("A field is invalid (named in `field`)"),
                    "503": _error_response("QKIT_API_TOKEN unset, or the backend is unavailable"),
                },
            },
            "get": {
                "operationId": "listJobs", "summary": "List jobs, newest first",
                "security": [{"apiToken": []}],
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATUSES)}},
                    {"name": "type", "in": "query", "schema": {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                                "default": DEFAULT_LIST_LIMIT}},
                    {"name": "before_id", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
                ],
                "responses": {
                    "200": {"description": "A page of jobs (payload and result omitted); `next` links the next page",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}}},
                    "401": _error_response("Missing or invalid token"),
                    "422": _error_response("A query parameter is invalid (named in `field`)"),
                    "503": _error_response("QKIT_API_TOKEN unset, or the backend is unavailable"),
                },
            },
        },
        "/api/jobs/{id}": {
            "get": {
                "operationId": "getJob", "summary": "One job with its attempts",
                "security": [{"apiToken": []}],
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}],
                "responses": {
                    "200": {"description": "The job",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                    "401": _error_response("Missing or invalid token"),
                    "404": _error_response("No such job in this queue"),
                    "503": _error_response("QKIT_API_TOKEN unset, or the backend is unavailable"),
                },
            },
        },
        "/api/workers": {
            "post": {
                "operationId": "runBurst", "summary": "Run one worker burst",
                "security": [{"workerSecret": []}, {"qstashSignature": []}],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/BurstRequest"}}}},
                "responses": {
                    "200": {"description": "The burst's summary (also when jobs failed); budgets are clamped "
                                           "to the server's caps and echoed",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BurstSummary"}}}},
                    "400": _error_response("Body is not a JSON object"),
                    "401": _error_response("Missing or invalid secret or signature"),
                    "408": _error_response("Body too slow"),
                    "413": _error_response("Body too large"),
                    "422": _error_response("A field is invalid (named in `field`)"),
                    "500": _error_response("Server misconfiguration"),
                    "503": _error_response("WORKER_SECRET unset, or the backend is unavailable"),
                },
            },
        },
        "/api/health": {
            "get": {
                "operationId": "health", "summary": "Backend reachability", "security": [],
                "responses": {
                    "200": {"description": "Redis and the ledger answer",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                    "503": {"description": "A backend does not answer",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                },
            },
        },
    },
}

"""A local, Upstash-compatible REST endpoint in front of a real Redis server.

It lets the unmodified ``upstash-redis`` client (and so qkit's Upstash backend)
run against a redis-server on this machine, with Upstash's wire protocol:

* ``POST /``            one command, body ``["CMD", arg, ...]``
* ``POST /pipeline``    several commands, not atomic, one reply per command
* ``POST /multi-exec``  several commands inside MULTI/EXEC

Replies follow Upstash's REST shapes (``{"result": ...}`` / ``{"error": ...}``,
RESP2 values, ``Upstash-Encoding: base64`` for strings, 400 for Redis errors
with the full error text, 401 for a bad token, JSON bodies everywhere).  The
commands Upstash REST cannot serve (blocking and connection-state commands)
are refused.  See docs/architecture.md#the-upstash-backend-and-its-local-endpoint.

For tests there are two knobs on ``app.state``, changeable while serving:
``latency_ms`` (a sleep before each command request is answered) and
``faults`` (a :class:`FaultPlan`, a queue of per-request failures such as
"run the command, then drop the connection").

Run it with ``python -m qkit.dev.upstash --redis-url redis://127.0.0.1:6379/0``
(token from ``--token`` or ``UPSTASH_REDIS_REST_TOKEN``).  Neither the token nor
request bodies are ever logged.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import redis.asyncio
import uvicorn
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from qkit.accesslog import AccessLog
from qkit.api.errors import http_error
from qkit.config import url_for_messages
# FaultPlan, EndpointStats and the limits are public here too (tests and bench import them from this module)
from qkit.dev.upstash_wire import (DEFAULT_MAX_BODY_BYTES, EXECABORT, FAULT_ACTIONS, MAX_REQUEST_SIZE,  # noqa: F401
                                   ROUTES, WRONGPASS, EndpointStats, FaultPlan, KeyLocking, RestError, as_command,
                                   encode_reply, error_text, parse_body, refusal, reply_item)

__all__ = [
    "FAULT_ACTIONS",
    "EndpointStats",
    "FaultPlan",
    "ThreadedEndpoint",
    "create_app",
    "main",
    "serve",
    "start_in_thread",
]

logger = logging.getLogger("qkit.dev.upstash")

def _authorized(request: Request, expected: bytes) -> bool:
    for name, value in request.headers.raw:
        if name == b"authorization":
            scheme, _, presented = value.partition(b" ")
            # Raw header bytes, compared in constant time: a non-ASCII token
            # is simply a mismatch (401), never a decoding error (500).
            return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), expected)
    return False


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RestError(400, MAX_REQUEST_SIZE)
    body = bytearray()
    async for chunk in request.stream():  # counted while reading: never buffer more than the limit
        body += chunk
        if len(body) > limit:
            raise RestError(400, MAX_REQUEST_SIZE)
    return bytes(body)


# --------------------------------------------------------------------------- talking to Redis
async def _send(pool: redis.asyncio.ConnectionPool, wire: list[list[str]]) -> list[Any]:
    """Send commands on one raw connection; return one reply or ResponseError each.

    A raw connection bypasses redis-py's response callbacks, which would turn
    SET into a bool, ZRANGE WITHSCORES into tuples and so on; Upstash answers
    with plain RESP2 values.
    """
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(conn.pack_commands(wire))
        replies: list[Any] = []
        for _ in wire:
            try:
                replies.append(await conn.read_response())
            except ResponseError as err:  # an error reply: the connection stays in sync
                replies.append(err)
        return replies
    except BaseException:
        # Cancelled or broken mid-reply: never hand a half-read connection to the next request.
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


# --------------------------------------------------------------------------- responses
def _json(status: int, body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _html_500() -> Response:
    # What a proxy or load balancer in front of Upstash answers: not JSON, so
    # the client's r.json() fails (pitfall P3).
    return Response(
        "<html><body><h1>500 Internal Server Error</h1></body></html>",
        status_code=500,
        media_type="text/html",
    )


class _DropConnection(Response):
    """Start a response whose body never comes, so the server closes the socket.

    ASGI has no "close the connection" message; uvicorn closes the transport
    when an application returns without completing its response (it logs one
    "returned without completing response" line, and nothing of the request).
    The client sees the connection end mid-answer, like a dropped link.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
            }
        )


async def _hang(request: Request, seconds: float) -> None:
    """Wait until the client disconnects (it timed out) or ``seconds`` pass."""

    async def disconnected() -> None:
        while True:
            message = await request.receive()  # body is consumed: only http.disconnect can come
            if message["type"] == "http.disconnect":
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(disconnected(), seconds)


# --------------------------------------------------------------------------- the handlers
@dataclass
class _Config:
    pool: redis.asyncio.ConnectionPool
    token: bytes


async def _answer(request: Request, route: str) -> Response:
    """Authenticate, parse, run and encode one command request."""
    state = request.app.state
    config: _Config = state.config
    stats: EndpointStats = state.stats
    if not _authorized(request, config.token):
        stats.unauthorized += 1
        return _json(401, {"error": WRONGPASS})
    fmt = request.headers.get("upstash-response-format", "json").lower()
    if fmt != "json":
        # resp2 raw replies exist on Upstash but the Python client never asks for them.
        return _json(400, {"error": "ERR only Upstash-Response-Format: json is supported here"})
    b64 = request.headers.get("upstash-encoding", "").lower() == "base64"
    body = parse_body(await _read_body(request, state.max_body_bytes))

    if route == "/":
        command = state.key_locking.translate(as_command(body), stats)
        refused = refusal(command)
        if refused:
            return _json(400, {"error": refused})
        stats.commands += 1
        (reply,) = await _send(config.pool, [command])
        if isinstance(reply, ResponseError):
            return _json(400, {"error": error_text(reply)})
        return _json(200, {"result": encode_reply(reply, b64)})

    if not isinstance(body, list) or not body:
        raise RestError(400, "ERR the body must be a non-empty JSON array of commands")
    commands = [state.key_locking.translate(as_command(item), stats) for item in body]
    refusals = [refusal(c) for c in commands]

    if route == "/pipeline":
        # Refused commands become per-item errors; the others still run, in order.
        runnable = [c for c, r in zip(commands, refusals) if r is None]
        stats.commands += len(runnable)
        replies = iter(await _send(config.pool, runnable) if runnable else [])
        items = [
            {"error": r} if r is not None else reply_item(next(replies), b64)
            for r in refusals
        ]
        return _json(200, items)

    # /multi-exec: a refused command discards the whole transaction, exactly as a
    # queue-time error inside MULTI would, so nothing is sent at all.
    if any(r is not None for r in refusals):
        return _json(400, {"error": EXECABORT})
    stats.commands += len(commands)
    replies = await _send(config.pool, [["MULTI"], *commands, ["EXEC"]])
    result = replies[-1]
    if isinstance(result, ResponseError):  # EXECABORT (queue-time error, CROSSSLOT, …)
        return _json(400, {"error": error_text(result)})
    return _json(200, [reply_item(value, b64) for value in result])


def _command_endpoint(route: str):
    async def endpoint(request: Request) -> Response:
        state = request.app.state
        stats: EndpointStats = state.stats
        stats.requests += 1
        stats.by_route[route] = stats.by_route.get(route, 0) + 1
        faults: FaultPlan | None = state.faults
        action = faults.next_action() if faults is not None else "ok"
        latency_ms = float(state.latency_ms or 0.0)
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000.0)
            stats.latency_sleeps += 1

        if action == "500_before":
            return _html_500()
        if action == "500_json_before":
            return _json(500, {"error": "ERR injected server error"})
        if action == "drop_before":
            return _DropConnection()
        try:
            response = await _answer(request, route)
        except RestError as err:
            response = _json(err.status, {"error": err.message})
        except (RedisConnectionError, RedisTimeoutError):
            # Also raised by redis-py for some error *replies* (LOADING,
            # NOAUTH, max clients).  Never include the Redis URL: it may hold
            # a password.
            response = _json(500, {"error": "ERR the dev endpoint cannot reach its Redis server"})
        if action == "500_after":
            return _html_500()
        if action == "drop_after":
            return _DropConnection()
        if action == "timeout_after":
            await _hang(request, faults.hang_seconds if faults is not None else 30.0)
        return response

    endpoint.__name__ = f"command_{route.strip('/') or 'single'}"
    return endpoint


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "ERR internal error in the dev endpoint"}, status_code=500)


def create_app(
    redis_url: str,
    token: str,
    latency_ms: float = 0.0,
    faults: FaultPlan | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """Build the Starlette app forwarding Upstash REST requests to ``redis_url``.

    ``app.state.latency_ms``, ``app.state.faults`` (a :class:`FaultPlan`, empty
    by default), ``app.state.max_body_bytes`` can be changed while serving;
    ``app.state.stats`` (:class:`EndpointStats`) counts what was served.
    """
    if not token:
        raise ValueError("the dev endpoint needs a non-empty token")
    # protocol=2: Upstash replies have RESP2 shapes (redis-py 8 defaults to
    # RESP3, where HGETALL is a map and ZSCORE a double).  decode_responses
    # stays False: bytes in, base64 out.
    pool = redis.asyncio.ConnectionPool.from_url(
        redis_url, protocol=2, decode_responses=False, socket_connect_timeout=5
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await pool.aclose()

    routes = [Route(path, _command_endpoint(path), methods=["POST"]) for path in ROUTES]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(AccessLog, logger=logger, route_of=lambda path: path if path in ROUTES else "<other>")],
        exception_handlers={HTTPException: http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.config = _Config(pool=pool, token=token.encode("utf-8"))
    app.state.latency_ms = float(latency_ms)
    app.state.faults = faults if faults is not None else FaultPlan()
    app.state.max_body_bytes = int(max_body_bytes)
    app.state.stats = EndpointStats()
    app.state.key_locking = KeyLocking()  # Upstash accepts allow-key-locking; the Redis behind it would not
    return app


# --------------------------------------------------------------------------- running it
@dataclass
class ThreadedEndpoint:
    """An endpoint served by uvicorn in a daemon thread (for tests and notebooks)."""

    app: Starlette
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        """The base URL to give the client as ``UPSTASH_REDIS_REST_URL``."""
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0
) -> ThreadedEndpoint:
    """Serve ``app`` in a background thread; return once uvicorn has started.

    ``port=0`` picks a free port: the socket is bound here and handed to
    uvicorn, so there is no window in which another process can take it.
    """
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets whose proto says TCP; without it Nagle's algorithm adds ~40 ms per large reply
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,            # keep the host's logging setup (and pytest's caplog)
        access_log=False,           # qkit.accesslog replaces it: uvicorn's would log query strings
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"upstash-dev-{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:  # uvicorn flips this once it listens
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the Upstash dev endpoint did not start")
        time.sleep(0.01)
    return ThreadedEndpoint(app=app, server=server, thread=thread, host=host, port=bound_port)


def serve(
    redis_url: str,
    token: str,
    host: str = "127.0.0.1",
    port: int = 8079,
    latency_ms: float = 0.0,
) -> None:
    """Serve the endpoint in the foreground until interrupted (the CLI's job)."""
    app = create_app(redis_url, token, latency_ms=latency_ms)
    if not logging.getLogger().handlers:
        # uvicorn configures only its own loggers; without this the startup
        # and access lines of this module would be dropped.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach it and knows the token can use this Redis", host)
    logger.info(
        "Upstash-compatible endpoint on http://%s:%d -> %s (latency %.1f ms)",
        host, port, url_for_messages(redis_url), latency_ms,
    )
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qkit.dev.upstash --redis-url URL [--token T] [--port P] [--latency-ms MS]``."""
    parser = argparse.ArgumentParser(
        prog="python -m qkit.dev.upstash",
        description="Serve an Upstash-compatible REST endpoint in front of a local Redis.",
    )
    parser.add_argument("--redis-url", required=True, help="the Redis server to forward to")
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token clients must send (default: $UPSTASH_REDIS_REST_TOKEN; "
        "prefer the variable: command lines are visible to other users)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8079)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="sleep this long before each answer")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("UPSTASH_REDIS_REST_TOKEN", "")
    if not token:
        parser.error("a token is required: --token or UPSTASH_REDIS_REST_TOKEN")
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    serve(args.redis_url, token, host=args.host, port=args.port, latency_ms=args.latency_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A privacy-safe access log for qkit's HTTP servers (the API and the local Upstash endpoint).

One line per request: client host, method, route template, status, time.
Never headers, query strings or bodies: tokens and payloads live there.  It
replaces uvicorn's access log, which prints the query string.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class AccessLog:
    """ASGI middleware logging each request through ``logger``.

    ``route_of`` maps a request path to what may be logged (a route template,
    or ``<other>``): a raw path can carry arguments or secrets.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger, route_of: Callable[[str], str]) -> None:
        self.app = app
        self.logger = logger
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            self.logger.info("%s %s %s %s %.1fms", client[0], scope.get("method", "?"),
                             self.route_of(scope.get("path", "")), status[0] if status else "-",
                             (time.perf_counter() - started) * 1000.0)

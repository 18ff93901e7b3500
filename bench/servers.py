"""Throw-away servers for the benchmarks: redis-server, PostgreSQL, the local Upstash endpoint.

redis-server and PostgreSQL come from :mod:`qkit.dev.servers` (shared with the
test suite; ``bench/`` must not import from ``tests/``).  The Upstash starter
is the benchmarks' own: it can set TCP_NODELAY on the endpoint.  Every
starter waits for readiness by polling (never a fixed sleep) and returns an
object whose ``stop()`` is idempotent.
"""
from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from qkit.dev.servers import Postgres, RedisServer, start_postgres, start_redis

__all__ = ["Postgres", "RedisServer", "UpstashEndpoint", "start_postgres", "start_redis", "start_upstash"]


@dataclass
class UpstashEndpoint:
    """qkit's local Upstash REST endpoint (a uvicorn thread of this process)."""

    url: str
    token: str
    app: Any
    _endpoint: Any = field(repr=False)

    @property
    def stats(self) -> Any:
        """:class:`qkit.dev.upstash.EndpointStats`: requests and commands served so far."""
        return self.app.state.stats

    def stop(self) -> None:
        self._endpoint.stop()


def start_upstash(redis_url: str, latency_ms: float = 0.0, nodelay: bool = True) -> UpstashEndpoint:
    """``create_app`` + ``start_in_thread`` in front of ``redis_url``, with injected latency.

    ``nodelay``: set TCP_NODELAY on the endpoint's listening socket (Linux
    passes it on to accepted connections).  ``start_in_thread`` creates that
    socket with protocol 0, so asyncio does not set TCP_NODELAY on the
    connections it accepts, and an answer written in several pieces waits for
    the client's delayed ACK (Nagle): about 40 ms per large request, which
    would measure the dev endpoint's socket setup instead of qkit.
    """
    from qkit.dev.upstash import create_app, start_in_thread

    token = "bench-" + secrets.token_hex(12)
    app = create_app(redis_url, token, latency_ms=latency_ms)
    endpoint = start_in_thread(app)
    if nodelay:
        for server in getattr(endpoint.server, "servers", None) or []:
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return UpstashEndpoint(endpoint.url, token, app, endpoint)

"""Any Redis server over TCP or a unix socket, through redis-py (RESP2)."""
from __future__ import annotations

from typing import Any, Sequence

import redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from qkit.backends.base import Backend
from qkit.config import redact
from qkit.errors import BackendUnavailable, QkitError
from qkit.logs import log
from qkit.lua import Script



class RedisBackend(Backend):
    """A Redis reached by URL (``QKIT_REDIS_URL``)."""

    kind = "redis"
    variable = "QKIT_REDIS_URL"

    def __init__(self, url: str | None = None, *, client: redis.Redis | None = None,
                 check_eviction: bool = True) -> None:
        super().__init__()
        self.url = url or ""
        # protocol=2 keeps reply shapes identical to Upstash's REST replies (RESP2)
        self.client = client or redis.Redis.from_url(url, protocol=2, decode_responses=True,
                                                     socket_timeout=30, socket_connect_timeout=5,
                                                     health_check_interval=30)
        if check_eviction:
            self._warn_if_evicting()

    def describe(self) -> str:
        return redact(self.url) if self.url else self.kind

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"cannot reach Redis at {self.variable}={self.describe()}: "
                                  f"{redact(str(exc)) or type(exc).__name__}")

    def run_script(self, script: Script, keys: list[str], args: list[str]) -> Any:
        try:
            try:
                reply = self.client.evalsha(script.sha, len(keys), *keys, *args)
                self._count(1)
                return reply
            except NoScriptError:
                self._count(1)
                reply = self.client.eval(script.source, len(keys), *keys, *args)
                self._count(1)
                return reply
        except ResponseError as exc:
            raise QkitError(f"Redis refused script {script.name}: {exc}") from None
        except RedisError as exc:
            raise self._unavailable(exc) from None

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = pipe.execute()
        except RedisError as exc:
            raise self._unavailable(exc) from None
        self._count(len(commands))
        return replies

    def ping(self) -> bool:
        try:
            self.client.ping()
        except RedisError as exc:
            raise self._unavailable(exc) from None
        self._count(1)
        return True

    def _warn_if_evicting(self) -> None:
        """Warn once when the server may evict keys: an evicted job is a lost job."""
        try:
            policy = self.client.config_get("maxmemory-policy").get("maxmemory-policy")
        except RedisError:
            return  # CONFIG is often disabled on managed servers; nothing to check
        if policy and policy != "noeviction":
            log.warning("Redis at %s has maxmemory-policy=%s: it may evict queued jobs; "
                        "set it to noeviction", self.describe(), policy)

    def close(self) -> None:
        self.client.close()

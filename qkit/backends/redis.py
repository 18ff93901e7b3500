"""Any Redis server over TCP or a unix socket, through redis-py (RESP2); a Redis Cluster through redis-py's
cluster client (docs/cluster.md)."""
from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from qkit.backends.base import Backend, WakeListener
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
        self.client = client or _client_for(url)
        self.cluster = isinstance(self.client, redis.RedisCluster)
        if check_eviction:
            self._warn_if_evicting()

    def describe(self) -> str:
        where = redact(self.url) if self.url else self.kind
        return f"{where} (cluster)" if self.cluster else where

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

    def wake_listener(self, channel: str) -> WakeListener:
        return PubSubListener(self.client, channel)

    def _warn_if_evicting(self) -> None:
        """Warn once when the server may evict keys: an evicted job is a lost job."""
        try:
            if self.cluster:  # one reply per primary: warn about any that may evict
                reply = self.client.config_get("maxmemory-policy", target_nodes=redis.RedisCluster.PRIMARIES)
                per_node = reply.values() if all(isinstance(r, dict) for r in reply.values()) else [reply]
                policies = {r.get("maxmemory-policy") for r in per_node}  # one node answers with its dict alone
            else:
                policies = {self.client.config_get("maxmemory-policy").get("maxmemory-policy")}
        except RedisError:
            return  # CONFIG is often disabled on managed servers; nothing to check
        for policy in sorted(p for p in policies if p and p != "noeviction"):
            log.warning("Redis at %s has maxmemory-policy=%s: it may evict queued jobs; "
                        "set it to noeviction", self.describe(), policy)

    def close(self) -> None:
        self.client.close()


class PubSubListener(WakeListener):
    """SUBSCRIBE on a connection of its own, without health-check PINGs: an idle worker sends nothing."""

    #: how often the wait looks at its stop event (a local check; no command is sent)
    SLICE_S = 0.2

    def __init__(self, client: redis.Redis | redis.RedisCluster, channel: str) -> None:
        if isinstance(client, redis.RedisCluster):
            self.client = client  # the cluster client's pubsub opens its own node connection
        else:
            pool = client.connection_pool
            kwargs = {**pool.connection_kwargs, "health_check_interval": 0, "socket_timeout": None}
            self.client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                                           **kwargs))
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            self.pubsub.subscribe(channel)
        except RedisError as exc:
            raise BackendUnavailable(f"cannot subscribe to the queue's wake-up channel: {exc}") from None

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self.pubsub.get_message(timeout=min(self.SLICE_S, left)) is not None:
                    while self.pubsub.get_message(timeout=0) is not None:  # one wake-up for what is buffered
                        pass
                    return True
        except RedisError:
            # the connection broke (a restart?): the worker's next claim finds out and says so
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return False

    def close(self) -> None:
        try:
            self.pubsub.close()
        finally:
            if not isinstance(self.client, redis.RedisCluster):
                self.client.close()


def client_options() -> dict[str, Any]:
    """Connection settings of qkit's clients; protocol=2 keeps reply shapes identical to Upstash's REST replies
    (RESP2).  The library's name and version for ``CLIENT SETINFO`` are given: redis-py would otherwise look its
    version up in the installed packages' metadata for each client (about 3 ms of a worker's start-up)."""
    options: dict[str, Any] = dict(protocol=2, decode_responses=True, socket_timeout=30, socket_connect_timeout=5)
    try:
        from redis.driver_info import DriverInfo  # recent redis-py; older versions look their version up themselves
    except ImportError:
        return options
    return {**options, "driver_info": DriverInfo(lib_version=redis.__version__)}


def _client_for(url: str) -> redis.Redis | redis.RedisCluster:
    """A plain client, or redis-py's cluster client when the server says ``cluster_enabled:1``.

    Every key of a queue shares one hash tag, so each script call goes whole to the shard that owns the
    queue's slot; the cluster client follows MOVED redirections and a failover's new topology.  The check
    costs one ``INFO cluster`` per connect; a server that does not answer is left to the first real command,
    which says so in one line.
    """
    plain = redis.Redis.from_url(url, health_check_interval=30, **client_options())
    try:
        enabled = int(plain.info("cluster").get("cluster_enabled", 0)) == 1
    except (RedisError, ValueError):
        return plain
    if not enabled:
        return plain
    plain.close()
    return redis.RedisCluster.from_url(url, **client_options())

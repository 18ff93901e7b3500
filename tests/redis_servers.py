"""Real redis-server processes for tests: a plain one and a one-node cluster.

The code is :mod:`qkit.dev.servers` (shared with ``bench/``); these are the
names the tests import.  Each server gets its own directory under the given
folder and is ready (answers PING; for the cluster, ``cluster_state:ok``)
when the start function returns.
"""
from __future__ import annotations

from pathlib import Path

from qkit.dev.servers import RedisServer, free_port, start_redis

__all__ = ["RedisServer", "free_port", "start_cluster_redis", "start_plain_redis"]


def start_plain_redis(tmp_path: Path, port: int | None = None, timeout: float = 10.0) -> RedisServer:
    """A standalone redis-server with its data under ``tmp_path``."""
    return start_redis(tmp_path, port=port, timeout=timeout)


def start_cluster_redis(tmp_path: Path, port: int | None = None, timeout: float = 10.0) -> RedisServer:
    """A one-node Redis Cluster owning all 16384 slots (real ``CROSSSLOT`` errors), data under ``tmp_path``."""
    return start_redis(tmp_path, cluster=True, port=port, timeout=timeout)

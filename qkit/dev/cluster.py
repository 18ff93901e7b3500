"""A throw-away multi-master Redis Cluster for tests and benchmarks (docs/cluster.md).

``start_redis_cluster(folder, masters=3, replicas=1)`` starts ``masters * (1 +
replicas)`` redis-servers with ``--cluster-enabled yes`` (through
:func:`qkit.dev.servers.start_redis`'s launcher) and joins them with
``redis-cli --cluster create``, as a user following Redis's cluster tutorial
would.  It returns once every node says ``cluster_state:ok`` and every replica
has synced.  :meth:`RedisClusterServers.fail_over` kills a shard's primary and
promotes its replica (``CLUSTER FAILOVER TAKEOVER``), the fault a cluster user
meets when a machine dies.

Runtime code never imports this module.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from redis.crc import key_slot

from qkit.dev.servers import RedisServer, free_cluster_port, start_redis, wait_until


@dataclass
class RedisClusterServers:
    """The nodes of a local Redis Cluster; ``url`` points at one of them (any node will do)."""

    nodes: list[RedisServer]
    dead: list[RedisServer] = field(default_factory=list)

    @property
    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n not in self.dead]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.live[0].port}"

    def primary_for(self, key: str) -> RedisServer:
        """The node that serves ``key``'s hash slot now."""
        slot = key_slot(key.encode())
        client = self.live[0].client(socket_timeout=5)
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            client.close()
        raise RuntimeError(f"no node serves slot {slot}")

    def primaries(self) -> list[RedisServer]:
        """The nodes that serve slots now, one per shard."""
        client = self.live[0].client(socket_timeout=5)
        try:
            ports = {int(primary[1]) for _, _, primary, *_ in client.execute_command("CLUSTER", "SLOTS")}
        finally:
            client.close()
        return [n for n in self.nodes if n.port in ports]

    def replica_of(self, primary: RedisServer) -> RedisServer:
        client = primary.client(socket_timeout=5)
        try:
            info = client.info("replication")
        finally:
            client.close()
        ports = {int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)}
        return next(n for n in self.live if n.port in ports)

    def fail_over(self, primary: RedisServer) -> RedisServer:
        """``kill -9`` ``primary``; its replica takes over its slots.  Returns the new primary once every live
        node agrees the cluster is ok again and the replica serves the slots."""
        replica = self.replica_of(primary)
        primary.crash()
        self.dead.append(primary)
        client = replica.client(socket_timeout=5)
        try:
            client.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            wait_until(lambda: client.info("replication").get("role") == "master", 30,
                       f"replica on port {replica.port} to take over")
        finally:
            client.close()
        self.wait_ok()
        return replica

    def wait_ok(self, timeout: float = 30.0) -> None:
        for node in self.live:
            client = node.client(socket_timeout=5)
            try:
                wait_until(lambda: "cluster_state:ok" in client.execute_command("CLUSTER", "INFO"), timeout,
                           f"cluster node on port {node.port} to say cluster_state:ok", interval=0.05)
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _start_node(directory: Path, attempts: int = 20) -> RedisServer:
    """A cluster-enabled redis-server on a free port low enough for its bus port (a free port from the
    kernel may be above 55535, which redis-server refuses in cluster mode)."""
    last: Exception | None = None
    for _ in range(attempts):
        port = free_cluster_port()
        try:
            return start_redis(directory, port=port, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "2000"])
        except RuntimeError as exc:  # taken between the probe and the bind: try another
            last = exc
    raise RuntimeError(f"no port for a cluster node after {attempts} tries: {last}")


def start_redis_cluster(folder: Path, *, masters: int = 3, replicas: int = 1,
                        timeout: float = 60.0) -> RedisClusterServers:
    """Start and join a cluster of ``masters`` shards with ``replicas`` replicas each, on free ports."""
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    folder = Path(folder)
    nodes: list[RedisServer] = []
    try:
        for _ in range(masters * (1 + replicas)):
            nodes.append(_start_node(folder / f"node-{len(nodes)}"))
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        servers = RedisClusterServers(nodes)
        servers.wait_ok(timeout)
        if replicas:
            replica_nodes = [n for n in nodes if n not in servers.primaries()]
            for node in replica_nodes:
                wait_until(node.replicating, timeout, f"replica on port {node.port} to sync", interval=0.05)
        return servers
    except BaseException:
        for node in nodes:
            node.stop()
        raise

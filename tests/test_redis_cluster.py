"""qkit on a real three-master Redis Cluster with one replica per shard (docs/cluster.md).

``qkit.connect(queue=name, redis_url=<any one node>)`` must work for every queue, whichever shard owns its
hash tag: the backend sees ``cluster_enabled:1`` and uses redis-py's cluster client, which sends each
script call whole to the shard of the queue's ``{tag}`` and follows MOVED redirections.  Then a shard's
primary is killed (``kill -9``) and its replica takes over; the replica is then emptied, the worst case of
asynchronous replication (it had none of the queue's writes): nothing acknowledged is lost, because the
next burst pushes the ledger's pending jobs again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from redis.crc import key_slot

import qkit
from qkit.dev.cluster import RedisClusterServers, start_redis_cluster
from qkit.ops.audit import audit


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = start_redis_cluster(tmp_path_factory.mktemp("cluster3"), masters=3, replicas=1)
    yield servers
    servers.stop()


def _key(queue: str) -> str:
    return f"qkit:{{{queue}}}:ready"


def one_queue_per_shard(cluster: RedisClusterServers, prefix: str) -> dict[int, str]:
    """A queue name for each primary's port, found by hashing candidate names' tags."""
    ports = {n.port for n in cluster.primaries()}
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"{prefix}-{i}"
        port = cluster.primary_for(_key(name)).port
        found.setdefault(port, name)
        if set(found) == ports:
            return found
    raise AssertionError("no queue name found for some shard")


def connect(cluster: RedisClusterServers, tmp_path: Path, queue: str, url: str | None = None) -> qkit.Queue:
    return qkit.connect(queue=queue, redis_url=url or cluster.url, database_url=f"sqlite:///{tmp_path / 'l.db'}",
                        backoff_base=0)


@qkit.handler("cluster_echo")
def cluster_echo(payload: dict) -> dict:
    if payload.get("fail_first") and qkit.current_job().attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"n": payload["n"]}


def test_every_queue_works_on_the_shard_that_owns_it(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_HOME", str(tmp_path / "home"))
    queues = one_queue_per_shard(cluster, "shard")
    assert len(queues) == 3
    for port, name in queues.items():
        # connect through a node that does NOT own the queue's slot: the client must follow MOVED
        other = next(n for n in cluster.primaries() if n.port != port)
        q = connect(cluster, tmp_path, name, url=other.url)
        try:
            assert q.backend.cluster, "the backend should have detected the cluster"
            ids = q.enqueue_many([{"type": "cluster_echo", "payload": {"n": i, "fail_first": i % 3 == 0},
                                   "priority": i % 2} for i in range(30)])
            delayed = q.enqueue("cluster_echo", {"n": 99}, delay=0.2)
            for node in cluster.primaries():  # the queue's keys are on the owning shard and nowhere else
                client = node.client()
                try:
                    assert bool(client.keys(f"qkit:{{{name}}}:*")) == (node.port == port), node.port
                finally:
                    client.close()
            summary = q.work(max_seconds=30)
            assert summary.completed == 31 and summary.failed == 0, summary
            assert {q.get(i).status for i in [*ids, delayed]} == {"completed"}
            assert q.get(ids[0]).attempts == 2  # retried once
            report = audit(q)
            assert report.clean and not report.findings, report.findings
            stats = q.stats()
            assert stats["completed"] == 31, stats
        finally:
            q.close()


def test_a_primary_killed_and_its_replica_promoted_loses_nothing_acknowledged(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_HOME", str(tmp_path / "home"))
    queues = one_queue_per_shard(cluster, "failover")
    victim_port, name = next(iter(queues.items()))
    victim = next(n for n in cluster.primaries() if n.port == victim_port)
    survivor = next(n for n in cluster.primaries() if n.port != victim_port)
    q = connect(cluster, tmp_path, name, url=survivor.url)
    try:
        acknowledged = q.enqueue_many([{"type": "cluster_echo", "payload": {"n": i}} for i in range(200)])
        assert q.work(max_jobs=50).completed == 50
        more = [q.enqueue("cluster_echo", {"n": 1000 + i}) for i in range(20)]  # may not reach the replica
        acknowledged += more
    finally:
        q.close()
    promoted = cluster.fail_over(victim)
    assert cluster.primary_for(_key(name)).port == promoted.port
    client = promoted.client()
    try:  # the worst case of asynchronous replication: the replica had received none of the queue's writes
        client.flushall()
    finally:
        client.close()

    q = connect(cluster, tmp_path, name, url=survivor.url)  # a new process's connection: the new topology
    try:
        summary = q.work(max_seconds=60)
        statuses = {i: q.get(i).status for i in acknowledged}
        assert set(statuses.values()) == {"completed"}, {s: sum(v == s for v in statuses.values())
                                                         for s in set(statuses.values())}
        assert summary.failed == 0
        report = audit(q)
        assert report.clean and not report.findings, report.findings
        # every queue on the other shards still works
        for port, other in queues.items():
            if port == victim_port:
                continue
            r = connect(cluster, tmp_path, other, url=promoted.url)
            try:
                r.enqueue("cluster_echo", {"n": 1})
                assert r.work(max_seconds=30).completed >= 1
            finally:
                r.close()
    finally:
        q.close()


def test_a_primary_that_may_evict_is_named_on_connect(cluster, caplog):
    from qkit.backends.redis import RedisBackend

    node = cluster.primaries()[-1]
    client = node.client()
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level("WARNING", logger="qkit"):
            backend = RedisBackend(cluster.url)
        backend.close()
        assert any("maxmemory-policy=allkeys-lru" in r.getMessage() and "(cluster)" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    finally:
        client.config_set("maxmemory-policy", "noeviction")


def test_cluster_nodes_get_ports_their_bus_can_follow():
    """redis-server refuses a cluster node above port 55535 (its bus is port + 10000): CI once drew one."""
    from qkit.dev.servers import HIGHEST_CLUSTER_PORT, free_cluster_port

    ports = [free_cluster_port() for _ in range(200)]
    assert max(ports) <= HIGHEST_CLUSTER_PORT and len(set(ports)) > 100

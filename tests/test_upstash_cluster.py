"""Hash-slot discipline: qkit on a one-node Redis Cluster, directly and through the Upstash endpoint.

A one-node cluster owning all 16384 slots answers plain connections like any
Redis, except that a command or script whose keys are in different slots
fails with ``CROSSSLOT``.  So a real workload through every script, on the
cluster, proves every script call keeps a queue's keys under one ``{tag}``:

* statically: each Dispatch method's script call is recorded and its keys
  hashed (``redis.crc.key_slot`` and the server's ``CLUSTER KEYSLOT``), for
  queue names with dots and dashes;
* dynamically: a workload through every script (enqueue, delayed enqueue,
  completions, retries with back-off, dead letters, a crashed claim reclaimed,
  lease renewal, replay, purge, inventory/snapshot, repair after a lost key)
  run with ``qkit.connect(redis_url=<cluster>)`` and through the local Upstash
  endpoint forwarding to the cluster; MONITOR records every command the
  server ran (also those inside scripts), and afterwards a SCAN shows no key
  outside ``qkit:{<queue>}:`` was created, and look-alike keys of other queues
  (another hash tag, our tag without the prefix, our name without braces)
  were never touched.

CROSSSLOT alone is not enough: a script without a shebang may still touch an
undeclared key of another slot on a cluster (Redis keeps that for backward
compatibility), hence MONITOR, whose detector is itself tested below.
"""
from __future__ import annotations

import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import redis
from redis.crc import key_slot
from sqlalchemy import select

import qkit
from conftest import wait_for
from qkit.backends.base import Backend
from qkit.backends.redis import RedisBackend
from qkit.engine.dispatch import QueueKeys, Settlement
from qkit.config import settings as resolve_settings
from qkit.errors import BadInput
from qkit.ops.explain import locate
from qkit.ledger import job_attempts, job_events
from qkit.ops.reconcile import repair
from qkit.lua import Script, load_script

SCRIPTS_DIR = Path(qkit.__file__).parent / "lua"
#: every production script (files starting with "_" are test-only)
SCRIPT_NAMES = sorted(p.stem for p in SCRIPTS_DIR.glob("*.lua") if not p.stem.startswith("_"))
QUEUE = "mail.out-v2.eu-west-1"
TOKEN = "cluster-test-" + secrets.token_hex(8)
LEASE = 0.6  # short, so the slow handler's lease must be renewed


# --------------------------------------------------------------------------- handlers
#: jobs whose "bug" is fixed: cl-bad fails unless its id is here (set before a replay)
FIXED: set[int] = set()


@qkit.handler("cl-ok", timeout=10)
def _ok(payload: dict) -> dict:
    return {"ok": True}


@qkit.handler("cl-flaky", timeout=10)
def _flaky(payload: dict) -> dict:
    if qkit.current_job().attempt == 1:
        raise RuntimeError("transient failure on the first attempt")
    return {"ok": True}


@qkit.handler("cl-bad", timeout=10)
def _bad(payload: dict) -> dict:
    if qkit.current_job().id not in FIXED:
        raise ValueError("this job always fails until its bug is fixed")
    return {"fixed": True}


@qkit.handler("cl-slow", timeout=10)
def _slow(payload: dict) -> dict:
    # Longer than the lease: the burst must renew it while this runs.
    time.sleep(float(payload["s"]))
    return {"slept": payload["s"]}


# --------------------------------------------------------------------------- MONITOR
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("a"): b"\a", ord("b"): b"\b",
            ord("\\"): b"\\", ord('"'): b'"'}


def _unrepr(text: bytes) -> bytes:
    """Undo Redis's sdscatrepr quoting of one MONITOR argument."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == ord("\\"):
            n = text[i + 1]
            if n == ord("x"):
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += _ESCAPES[n]
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


class Monitor:
    """Every command the server runs, scripts' inner commands included (MONITOR on a raw socket)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.commands: list[tuple[str, tuple[bytes, ...]]] = []  # (source, argv)
        self._buffer = b""
        first = self._read_line()
        assert first == b"+OK", first
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read_line(self) -> bytes | None:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _run(self) -> None:
        try:
            while (line := self._read_line()) is not None:
                # +1700000000.123456 [0 lua] "ZADD" "qkit:{q}:ready" "1" "2"
                head, _, rest = line.partition(b"] ")
                source = head.partition(b" [")[2].partition(b" ")[2].decode()
                self.commands.append((source, tuple(_unrepr(m) for m in _ARG.findall(rest))))
        except OSError:
            return

    def stop(self, rds: redis.Redis) -> None:
        """Make sure everything sent so far was seen, then close."""
        marker = "monitor-end-" + secrets.token_hex(4)
        rds.echo(marker)
        deadline = time.monotonic() + 10
        while not any(argv[-1:] == (marker.encode(),) for _, argv in self.commands[-5:]):
            assert time.monotonic() < deadline, "MONITOR never showed the end marker"
            time.sleep(0.01)  # poll interval while the reader thread catches up
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv(); close() alone would not
        self._thread.join(5)
        self.sock.close()

    def keys_touched(self, rds: redis.Redis, inside_scripts: bool = False) -> set[str]:
        """Every key named by any monitored command (or only by commands scripts ran), as the server
        itself extracts keys: a script call names all its KEYS, used or not."""
        # a one-word command (PING, TIME...) names no key; GETKEYS would refuse it for arity
        unique = list(dict.fromkeys(argv for source, argv in self.commands
                                    if len(argv) > 1 and (source == "lua" or not inside_scripts)))
        rds = redis.Redis(connection_pool=rds.connection_pool)
        rds.response_callbacks.pop("COMMAND", None)  # redis-py would parse GETKEYS as COMMAND INFO
        pipe = rds.pipeline(transaction=False)
        for argv in unique:
            pipe.execute_command("COMMAND", "GETKEYS", *argv)
        keys: set[str] = set()
        for argv, reply in zip(unique, pipe.execute(raise_on_error=False)):
            if isinstance(reply, Exception):
                # TIME, PING, ECHO, EVALSHA with no keys...: commands that name no key
                assert "no key arguments" in str(reply) or "Invalid arguments" in str(reply), (argv[:3], reply)
                continue
            keys |= {k.decode() if isinstance(k, bytes) else k for k in reply}
        return keys

    def script_names(self) -> set[str]:
        """Which qkit scripts the server was asked to run (EVALSHA by SHA, EVAL by source)."""
        by_sha = {load_script(n).sha: n for n in SCRIPT_NAMES}
        by_source = {load_script(n).source: n for n in SCRIPT_NAMES}
        names = set()
        for _, argv in self.commands:
            verb = argv[0].upper() if argv else b""
            if verb == b"EVALSHA":
                names.add(by_sha.get(argv[1].decode(), "?"))
            elif verb == b"EVAL":
                names.add(by_source.get(argv[1].decode(), "?"))
        return names


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(module_cluster):
    return module_cluster


@pytest.fixture(scope="module")
def cluster_endpoint(cluster, endpoint_on):
    """The local Upstash endpoint forwarding to the one-node cluster."""
    return endpoint_on(cluster.url, TOKEN)


@pytest.fixture
def rds(cluster) -> Iterator[redis.Redis]:
    """redis-py straight to the cluster node, starting empty."""
    with cluster.client() as r:
        r.flushall()
        r.script_flush()  # so the workload also runs the EVALSHA -> NOSCRIPT -> EVAL path
        yield r


def _open(via: str, cluster, endpoint, tmp_path: Path, queue: str = QUEUE, **extra: Any) -> qkit.Queue:
    common = dict(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", **extra)
    if via == "redis":
        # a plain redis-py client on a cluster node: fine, all of a queue's keys share one slot
        return qkit.connect(queue, redis_url=cluster.url, **common)
    return qkit.connect(queue, upstash_url=endpoint.url, upstash_token=TOKEN, **common)


# --------------------------------------------------------------------------- static: keys per script call
class KeyRecorder(Backend):
    """A real backend that also records which keys each script call names."""

    def __init__(self, inner: Backend) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[str, list[str]]] = []

    def run_script(self, script: Script, keys: list[str], args: list[str]) -> Any:
        self.calls.append((script.name, list(keys)))
        return self.inner.run_script(script, keys, args)

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        return self.inner.pipeline(commands)

    def ping(self) -> bool:
        return self.inner.ping()


@pytest.mark.parametrize("aging", [0.0, 0.5])
@pytest.mark.parametrize("queue", [QUEUE, "a.b-c", "-", ".", "x_y.z-0", "q" * 64])
def test_every_script_call_keeps_its_keys_in_one_slot(cluster, rds, tmp_path, queue, aging):
    recorder = KeyRecorder(RedisBackend(cluster.url))
    # a real Queue on the recording backend, so each script is reached by the code path qkit uses
    q = qkit.Queue(queue, resolve_settings(redis_url=cluster.url, home=tmp_path, priority_aging=aging,
                                           database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}"),
                   backend=recorder)
    d = q.dispatch
    # every Dispatch method, every mode (and explain's locate): whatever a queue can ask of Redis
    assert d.push([(1, 0, 0), (2, 5, 0), (3, 0, 60_000)], mode="new") == 3
    claim = d.claim("tok-a", 0, 2)
    assert sorted(claim.claimed) == [1, 2]
    assert d.renew("tok-a", 1000, claim.claimed).lost == []
    settled = d.claim("tok-a", 1000, 1, [Settlement(1, "done"), Settlement(2, "dead")])
    assert settled.fenced == []
    assert d.push([(2, 0, 0)], mode="repair") == 1
    assert d.push([(4, 0, 0)], mode="dead") == 1
    assert d.remove([4], scope="dead") == 1
    assert d.remove([2, 3], scope="all") == 2
    assert d.push([(5, 0, 60_000)], mode="new") == 1 and d.promote(5) is True
    assert d.cancel(5, "remove") is True and d.cancel(5, "flag") is False
    assert d.set_paused(True) is True and d.set_paused(False) is True
    d.inventory()
    d.snapshot()
    locate(q, 3)
    # limits per type (limits.lua): the working copy, the types of queued jobs, the slots in use
    assert d.set_limits({"cl-ok": "5 1000 1"}) == 1
    assert d.tag_limited("cl-ok", [3]) == 0
    assert d.recount_limited() == {"cl-ok": 0}
    assert d.read_limits()["L:cl-ok"] == "5 1000 1"
    q.close()

    assert sorted({name for name, _ in recorder.calls}) == SCRIPT_NAMES, "a script is not covered here"
    tag_slot = key_slot(queue.encode())
    for name, keys in recorder.calls:
        assert keys, f"{name} named no key: it could not be routed on a cluster"
        for key in keys:
            # the whole queue name is the hash tag, whatever dots and dashes it holds
            assert key.startswith(f"qkit:{{{queue}}}:"), (name, key)
            assert key_slot(key.encode()) == tag_slot, (name, key)
            assert rds.execute_command("CLUSTER", "KEYSLOT", key) == tag_slot, (name, key)
    assert set(QueueKeys(queue).all) >= {k for _, keys in recorder.calls for k in keys}


def test_scripts_name_keys_only_through_KEYS():
    """A key built inside a script (a literal, or KEYS[i] .. 'x') would escape the slot check."""
    for name in SCRIPT_NAMES:
        source = load_script(name).source
        code = "\n".join(line.split("--", 1)[0] for line in source.splitlines())  # drop comments
        assert "qkit:" not in code, name
        assert not re.search(r"KEYS\[\d+\]\s*\.\.|\.\.\s*KEYS\[", code), name
        # every redis.call names its key through a variable (a KEYS alias) or KEYS[i], never a string
        for match in re.finditer(r"redis\.call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?", code):
            verb, first = match.group(1).upper(), (match.group(2) or "").strip()
            if verb == "TIME":
                continue
            assert not first.startswith(("'", '"')), (name, match.group(0))


def test_queue_names_cannot_carry_braces():
    # a '{' or '}' in the name would move the hash tag and split a queue's keys over slots
    for bad in ("a{b}", "{a}", "a}", "}{"):
        with pytest.raises(BadInput):
            qkit.connect(bad, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://")


def test_monitor_sees_undeclared_keys_inside_scripts(cluster, rds):
    """The detector the workload test relies on: a foreign key touched inside a script is seen."""
    monitor = Monitor(cluster.port)
    try:
        # allowed on a cluster for a flag-free script, although the key is in another slot
        rds.eval("redis.call('SET', KEYS[1], 1); redis.call('SET', 'qkit:{other}:ready', 1); return 1",
                 1, "qkit:{mine}:x")
    finally:
        monitor.stop(rds)
    assert monitor.keys_touched(rds) == {"qkit:{mine}:x", "qkit:{other}:ready"}


# --------------------------------------------------------------------------- dynamic: a real workload
def _drain(q: qkit.Queue) -> None:
    """Bursts until the ledger has nothing pending or processing, waiting on Redis state between them."""
    deadline = time.monotonic() + 25
    while True:
        q.work()
        counts = q.ledger.status_counts(q.name)
        if counts["pending"] + counts["processing"] == 0:
            return
        assert time.monotonic() < deadline, f"jobs never drained: {counts}"

        def actionable() -> bool:
            inv = q.dispatch.inventory()
            return inv.ready > 0 or inv.delayed_due > 0 or inv.leases_expired > 0

        wait_for(actionable, what="a delayed job to fall due or a lease to expire")


def _attempts(q: qkit.Queue, job_id: int) -> list[tuple[int, int, str | None]]:
    with q.ledger.read_engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            select(job_attempts.c.epoch, job_attempts.c.attempt, job_attempts.c.outcome)
            .where(job_attempts.c.job_id == job_id).order_by(job_attempts.c.epoch, job_attempts.c.attempt))]


def _events(q: qkit.Queue, job_id: int) -> list[str]:
    with q.ledger.read_engine.connect() as conn:
        return list(conn.execute(select(job_events.c.event).where(job_events.c.job_id == job_id)
                                 .order_by(job_events.c.id)).scalars())


def _assert_redis_matches_ledger(q: qkit.Queue) -> None:
    snap = q.dispatch.snapshot()
    failed = {j.id for j in q.jobs(status="failed", limit=10_000)}
    pending = {j.id for j in q.jobs(status="pending", limit=10_000)}
    assert snap.ready | set(snap.delayed) == pending
    assert not snap.leased
    assert snap.dead == failed


def _sentinels(rds: redis.Redis, queue: str) -> dict[str, bytes]:
    """Look-alike keys of other queues, filled with plausible state; returns their DUMPs."""
    other_tags = [queue[:-2], queue + "x", queue.replace(".", "-"), "default"]
    names = [f"qkit:{{{tag}}}:{part}" for tag in other_tags
             for part in ("ready", "delayed", "leased", "owners", "dead", "prio", "clock")]
    names += [f"{{{queue}}}:ready", f"qkit:{queue}:ready", f"qkit:{{{queue}}}", f"qkit:{{{queue}}}x:ready"]
    for name in names:
        if name.endswith(("owners", "prio")):
            rds.hset(name, mapping={str(i): "someone-else" for i in range(1, 40)})
        elif name.endswith("clock"):
            rds.set(name, "1")
        else:
            # ids our ledger also holds: a script reading the wrong key would act on them
            rds.zadd(name, {str(i): 0 for i in range(1, 40)})
    dumps = {}
    for name in names:
        # a same-slot look-alike is the dangerous one: the cluster could not catch a mistake there
        dumps[name] = rds.dump(name)
    return dumps


@pytest.mark.parametrize("aging", [0.0, 0.5])  # strict priority, and priority aging (its "clock" key)
@pytest.mark.parametrize("via", ["redis", "upstash"])
def test_workload_through_every_script_on_a_cluster(via, aging, cluster, cluster_endpoint, rds, tmp_path):
    FIXED.clear()
    sentinels = _sentinels(rds, QUEUE)
    monitor = Monitor(cluster.port)
    q = _open(via, cluster, cluster_endpoint, tmp_path, lease_seconds=LEASE, backoff_base=0.05, backoff_max=0.1,
              priority_aging=aging)
    try:
        # enqueue_many (push 'new'), with priorities and idempotency keys; a repeated key is deduplicated
        ok = q.enqueue_many([{"type": "cl-ok", "payload": {"i": i}, "priority": i % 3, "key": f"ok-{i}"}
                             for i in range(12)])
        assert q.enqueue_many([{"type": "cl-ok", "payload": {"i": 0}, "key": "ok-0"}]) == [ok[0]]
        q.limit("cl-flaky", rate=1000, per=1, concurrency=2)  # limits.lua, and typed jobs in push and claim
        flaky = q.enqueue_many([{"type": "cl-flaky", "payload": {}} for _ in range(4)])
        bad = q.enqueue_many([{"type": "cl-bad", "payload": {}, "max_attempts": 2} for _ in range(3)])
        slow = q.enqueue("cl-slow", {"s": LEASE * 1.5})
        delayed = [q.enqueue("cl-ok", {"delayed": True}, delay=0.3) for _ in range(2)]
        inv = q.dispatch.inventory()
        assert (inv.ready, inv.delayed) == (12 + 4 + 3 + 1, 2)
        assert locate(q, ok[0])["ready"] is not None  # qkit explain's view of one job

        # a worker claims three jobs, records the claim in the ledger, and dies (lease 0: expired at once)
        crash = q.dispatch.claim("w-crashed", 0, 3)
        assert len(crash.claimed) == 3
        q.ledger.claim(q.name, "w-crashed", crash.claimed, {}, q.backoff)
        wait_for(lambda: q.dispatch.inventory().leases_expired == 3, what="the crashed leases to expire")

        _drain(q)  # claim (settle done/retry/dead, reclaim), renew

        for job_id in ok + flaky + delayed + [slow]:
            assert q.get(job_id).status == "completed", job_id
        for job_id in flaky:
            assert [o for _, _, o in _attempts(q, job_id)] == ["failed", "completed"]
        for job_id in bad:
            assert q.get(job_id).status == "failed"
            assert [o for _, _, o in _attempts(q, job_id)] == ["failed", "failed"]
            assert "retry_scheduled" in _events(q, job_id)
        for job_id in crash.claimed:
            assert [o for _, _, o in _attempts(q, job_id)] == ["lost", "completed"]
            assert "reclaimed" in _events(q, job_id)
        assert "lease_renewed" in _events(q, slow)
        _assert_redis_matches_ledger(q)
        inv = q.dispatch.inventory()
        assert (inv.ready, inv.delayed, inv.leased, inv.dead) == (0, 0, 0, 3)

        # Redis loses the DLQ key: a full repair rebuilds it from the ledger (push 'dead')
        rds.delete(f"qkit:{{{QUEUE}}}:dead")
        assert q.dispatch.inventory().dead == 0
        done = repair(q)
        assert (done["pushed"], done["dead_lettered"]) == (0, 3)
        assert q.dispatch.snapshot().dead == set(bad)

        # the bug is fixed for two of them: replay (push 'repair'), they complete; purge the third (remove)
        FIXED.update(bad[:2])
        assert sorted(q.replay(bad[:2])) == sorted(bad[:2])
        _drain(q)
        assert [q.get(j).status for j in bad] == ["completed", "completed", "failed"]
        assert _attempts(q, bad[0])[-1] == (1, 1, "completed")
        assert q.purge_dead() == 1
        assert q.dispatch.snapshot().dead == set()

        # Redis loses the ready key while jobs wait: repair pushes them back (push 'repair')
        late = q.enqueue_many([{"type": "cl-ok", "payload": {"late": i}} for i in range(4)])
        rds.delete(f"qkit:{{{QUEUE}}}:ready")
        done = repair(q)
        assert (done["pushed"], done["dead_lettered"]) == (4, 0)
        assert q.dispatch.snapshot().ready == set(late)
        _drain(q)
        assert all(q.get(j).status == "completed" for j in late)
        _assert_redis_matches_ledger(q)
        assert q.stats()["failed"] == 0

        # cancel (cancel.lua), pause/resume (pause.lua), promote (promote.lua)
        gone, later = q.enqueue("cl-ok", {"c": 1}), q.enqueue("cl-ok", {"p": 1}, delay=3600)
        assert q.cancel(gone) is True and q.pause() is True
        assert q.work().stopped_by == "paused"
        assert q.resume() is True and q.promote(later) is True
        _drain(q)
        assert (q.get(gone).status, q.get(later).status) == ("cancelled", "completed")
        _assert_redis_matches_ledger(q)
    finally:
        q.close()
        monitor.stop(rds)

    # every production script really ran on the cluster (none refused with CROSSSLOT: the workload passed)
    assert monitor.script_names() == set(SCRIPT_NAMES)
    prefix = f"qkit:{{{QUEUE}}}:"
    touched = monitor.keys_touched(rds)
    assert touched, "MONITOR saw no key at all"
    assert {k for k in touched if not k.startswith(prefix)} == set()
    assert touched <= set(QueueKeys(QUEUE).all)
    # the aging path ran too, under the same tag (a strict-priority queue never reads its clock)
    assert (prefix + "clock" in monitor.keys_touched(rds, inside_scripts=True)) == (aging > 0)
    # nothing outside the queue's prefix was created, and the look-alikes are byte-for-byte intact
    found = set(rds.scan_iter(count=1000))
    assert {k for k in found if not k.startswith(prefix)} == set(sentinels)
    assert {k for k in found if k.startswith(prefix)} <= set(QueueKeys(QUEUE).all)
    for name, dump in sentinels.items():
        assert rds.dump(name) == dump, name

"""Upstash's ``allow-key-locking`` script flag (docs/upstash.md): sent to Upstash only.

On Upstash a script locks the whole database unless its shebang says ``#!lua flags=allow-key-locking``;
stock Redis 7 refuses that flag.  The Upstash backend adds it when ``QKIT_UPSTASH_KEY_LOCKING`` is ``on``
(or ``auto`` and the host is ``*.upstash.io``); the local endpoint accepts it as Upstash does and hands
Redis a bare ``#!lua`` shebang, under which a Redis Cluster node refuses any key a script did not declare,
the rule Upstash applies to flagged scripts.
"""
from __future__ import annotations

import secrets

import pytest
from redis.exceptions import ResponseError

import qkit
from qkit.lua import KEY_LOCKING_SHEBANG, load_script
from qkit.ops.audit import audit

TOKEN = "locking-" + secrets.token_hex(8)


@qkit.handler("locking-echo", timeout=10)
def _echo(payload: dict) -> dict:
    if payload.get("fail"):
        raise RuntimeError("always")
    return {"ok": True}


@pytest.fixture(scope="module")
def endpoint(module_cluster, endpoint_on):
    return endpoint_on(module_cluster.url, TOKEN)


def _workload(q: qkit.Queue) -> None:
    ids = q.enqueue_many([{"type": "locking-echo", "payload": {"i": i}, "priority": i % 3} for i in range(30)])
    failing = q.enqueue("locking-echo", {"fail": True}, max_attempts=2)
    q.enqueue("locking-echo", {"later": True}, delay=0.1)
    summary = q.work(max_seconds=20)
    assert (summary.completed, summary.failed) == (31, 1), summary
    assert q.replay(failing) == [failing]
    q.work(max_seconds=5)
    assert q.get(ids[0]).status == "completed"
    report = audit(q)
    assert report.clean, report.findings


def _connect(endpoint, tmp_path, monkeypatch, queue: str, setting: str) -> qkit.Queue:
    """A queue through the endpoint with ``QKIT_UPSTASH_KEY_LOCKING=setting``, the endpoint's counters zeroed."""
    monkeypatch.setenv("QKIT_UPSTASH_KEY_LOCKING", setting)
    endpoint.app.state.stats.reset()
    return qkit.connect(queue, upstash_url=endpoint.url, upstash_token=TOKEN, home=tmp_path,
                        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", backoff_base=0)


def test_scripts_carry_the_flag_when_asked_and_run_whole_under_strict_key_checks(endpoint, tmp_path, monkeypatch):
    stats = endpoint.app.state.stats
    q = _connect(endpoint, tmp_path, monkeypatch, "locking.q-1", "on")
    try:
        assert q.backend.key_locking
        _workload(q)
        scripts_sent = q.backend.counters()["commands"]
    finally:
        q.close()
    # every command this backend sends is a script call and carries the flag; the endpoint recognises all
    # but each script's first EVALSHA (NOSCRIPT: it has not seen that flagged text yet, then the EVAL comes)
    scripts = len({"push", "claim", "renew", "remove", "inventory", "locate"})
    assert stats.commands == scripts_sent and 0 <= stats.commands - stats.key_locking_scripts <= scripts
    assert stats.key_locking_scripts > scripts


def test_auto_sends_no_flag_to_an_endpoint_that_is_not_upstash_io(endpoint, tmp_path, monkeypatch):
    stats = endpoint.app.state.stats
    q = _connect(endpoint, tmp_path, monkeypatch, "locking.q-2", "auto")
    try:
        assert not q.backend.key_locking
        _workload(q)
    finally:
        q.close()
    assert stats.commands > 0 and stats.key_locking_scripts == 0


def test_redis_7_itself_refuses_the_flag(module_redis):
    client = module_redis.client()
    try:
        with pytest.raises(ResponseError, match="allow-key-locking"):
            client.eval(KEY_LOCKING_SHEBANG + "return 1", 0)
        script = load_script("locate")
        assert not script.source.startswith("#!")  # the files stay flag-free for Redis and the embedded server
    finally:
        client.close()


def test_a_bad_setting_is_one_line(monkeypatch, tmp_path):
    from qkit.errors import ConfigError

    monkeypatch.setenv("QKIT_UPSTASH_KEY_LOCKING", "maybe")
    with pytest.raises(ConfigError, match="QKIT_UPSTASH_KEY_LOCKING='maybe' must be one of auto, on, off"):
        qkit.connect("x", home=tmp_path)

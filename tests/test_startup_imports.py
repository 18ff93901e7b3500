"""A worker's start-up imports only what its burst uses (issue 17: start-up was a fifth of a 20,000-job run).

A burst worker process (``qkit work``, or ``qkit.connect(...).work()`` as bench/burst_worker.py does) on the
embedded server and a SQLite ledger runs real jobs; a handler module records, at the process's exit, which
modules it ever imported.  The deferred ones must not be among them, and the option that used to load
SQLAlchemy's PostgreSQL dialect on SQLite must still make ``ix_jobs_owner`` partial on both databases.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from conftest import Setup, embedded_sqlite_setup, scratch_ledger

#: deferred to where they are used (each cost the worker's start-up milliseconds; bench/README.md)
DEFERRED = {
    "sqlalchemy.dialects.postgresql": "loaded on SQLite by ix_jobs_owner's PostgreSQL option (qkit/ledger/schema.py)",
    "tqdm": "the CLI's progress bar, for a terminal only (qkit/cli.py)",
    "email.parser": "redis-py reading its own version from the installed metadata, per client "
                    "(qkit/backends/redis.py client_options)",
}
#: never on a burst's path: the API, notebooks' analysis, other backends and drivers
NEVER = ("qkit.api", "qkit.analysis", "qkit.runs", "qkit.dev", "qkit.backends.upstash", "upstash_redis", "httpx",
         "sqlalchemy.orm", "psycopg", "pandas", "matplotlib", "fastapi", "starlette", "jinja2", "croniter")

PROBE = '''
"""Handlers of tests/test_startup_imports.py: ``touch`` jobs; the modules imported are written at exit."""
import atexit, json, os, sys

import qkit

OUT = os.environ["STARTUP_PROBE_OUT"]


@qkit.handler("touch")
def touch(payload: dict) -> dict:
    return {}


@atexit.register
def _record() -> None:
    with open(OUT, "w") as fh:
        json.dump(sorted(sys.modules), fh)
'''



def _probed(setup: Setup, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A worker's environment with the probe's handlers, and the file where it lists its modules at exit."""
    (tmp_path / "startup_probe_handlers.py").write_text(textwrap.dedent(PROBE))
    out = tmp_path / "modules.json"
    env = setup.env(QKIT_HANDLERS="startup_probe_handlers", STARTUP_PROBE_OUT=out, QUEUE=setup.queue)
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    return env, out


ENTRIES = {
    "cli": [sys.executable, "-m", "qkit", "work", "--json"],
    "library": [sys.executable, "-c", "import os, qkit; qkit.connect(os.environ['QUEUE']).work()"],
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_a_burst_worker_imports_none_of_the_deferred_modules(entry, embedded_home, tmp_path):
    setup = embedded_sqlite_setup(embedded_home, tmp_path, f"startup-{entry}")
    env, out = _probed(setup, tmp_path)
    q = setup.connect()
    ids = q.enqueue_many([{"type": "touch", "payload": {"i": i}} for i in range(3)])
    argv = ENTRIES[entry] + (["--queue", setup.queue] if entry == "cli" else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)  # stderr: a pipe, no tty
    assert done.returncode == 0, done.stderr[-2000:]
    assert [q.get(i).status for i in ids] == ["completed"] * 3  # the burst ran them
    modules = set(json.loads(out.read_text()))
    assert {"sqlalchemy", "redis", "qkit.engine.worker"} <= modules  # the probe saw a real burst's process
    loaded = {name: why for name, why in DEFERRED.items() if name in modules}
    assert not loaded, f"imported on a burst worker's path: {loaded}"
    never = sorted(m for m in modules if m in NEVER or m.startswith(tuple(n + "." for n in NEVER)))
    assert not never, never


def test_on_a_terminal_the_burst_still_draws_its_bar(embedded_home, tmp_path):
    """tqdm, deferred to the terminal branch, is still imported and drawn there."""
    setup = embedded_sqlite_setup(embedded_home, tmp_path, "startup-tty")
    env, out = _probed(setup, tmp_path)
    q = setup.connect()
    ids = q.enqueue_many([{"type": "touch", "payload": {}} for _ in range(2)])
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    try:
        worker = subprocess.Popen([sys.executable, "-m", "qkit", "work", "--queue", setup.queue, "--json"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        drawn = b""
        while True:  # the terminal's side, read while the worker writes (it ends with EIO once the worker exits)
            if select.select([master], [], [], 120)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                drawn += chunk
            elif worker.poll() is not None:
                break
        assert worker.wait(timeout=120) == 0, drawn.decode(errors="replace")
    finally:
        os.close(master)
    assert f"burst {setup.queue}".encode() in drawn and b"2job" in drawn, drawn.decode(errors="replace")
    assert "tqdm" in json.loads(out.read_text())
    assert [q.get(i).status for i in ids] == ["completed"] * 2


def test_redis_clients_still_name_the_library_and_its_version(embedded_home, tmp_path):
    """CLIENT SETINFO carries what redis-py sent before, without the per-client metadata look-up."""
    q = embedded_sqlite_setup(embedded_home, tmp_path, "startup-setinfo").connect()
    info = q.backend.client.client_info()
    assert (info["lib-name"], info["lib-ver"]) == ("redis-py", redis.__version__)


def _indexdef(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                return conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_jobs_owner'")
                                    ).scalar_one()
            return conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_owner'")).scalar_one()
    finally:
        engine.dispose()


def _init_in_a_fresh_process(url: str, env: dict[str, str]) -> None:
    """``init_schema`` where no DDL ran before (the PostgreSQL option is added by the DDL itself)."""
    code = "import sys; from qkit.ledger import Ledger; L = Ledger(sys.argv[1]); print(L.init_schema()); L.close()"
    done = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_owner_index_stays_partial_when_created_and_when_migrated(setup, tmp_path):
    with scratch_ledger(setup, tmp_path, "qkit_owner_ix") as url:
        _init_in_a_fresh_process(url, setup.env())  # a new ledger: create_all
        assert "WHERE" in _indexdef(url) and "owner IS NOT NULL" in _indexdef(url), _indexdef(url)
        engine = create_engine(url)
        with engine.begin() as conn:  # back to v6, which had no owner index: the v7 migration makes it again
            conn.execute(text("DROP INDEX ix_jobs_owner"))
            conn.execute(text("UPDATE qkit_schema SET version = 6"))
        engine.dispose()
        _init_in_a_fresh_process(url, setup.env())
        assert "WHERE" in _indexdef(url) and "owner IS NOT NULL" in _indexdef(url), _indexdef(url)

"""A real PostgreSQL cluster for the test suite (redis-server: ``redis_servers.py``).

Started from the machine's binaries into a temporary folder, waited for by
polling its readiness (never a fixed sleep), and stopped at the end.  When
``QKIT_TEST_DATABASE_URL`` is set, that server is used instead.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from redis_servers import free_port



def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
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
class Server:
    url: str
    port: int
    stop: Callable[[], None] = field(repr=False)


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


def start_postgres(folder: Path) -> Server:
    """A throw-away PostgreSQL cluster on a free port, run as user ``postgres`` when we are root."""
    bindir = pg_bin_dir()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                    "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "pg.log"), "-w",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                          f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                    "start"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def stop() -> None:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    import psycopg

    wait_until(lambda: psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres").close() or True,
               30, f"PostgreSQL on port {port}")
    return Server(url, port, stop)

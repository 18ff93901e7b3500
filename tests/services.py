"""A real PostgreSQL cluster, real ``qkit serve`` processes and a real browser for the test suite (redis-server:
``redis_servers.py``).

``start_postgres`` is :func:`qkit.dev.servers.start_postgres` (shared with
``bench/``): a throw-away cluster in a temporary folder, waited for by polling,
stopped at the end.  When ``QKIT_TEST_DATABASE_URL`` is set, ``conftest.py``
uses that server instead.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from qkit.dev.servers import free_port, start_postgres, stop_process, wait_until

__all__ = ["ApiServer", "CHROMIUM", "Server", "chromium", "serve_home", "start_api_server", "start_postgres"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """What a fixture hands out for any server, started here or given by the environment."""

    url: str
    port: int
    stop: Callable[[], None] = field(repr=False)


@dataclass
class ApiServer:
    """A ``qkit serve`` process; ``stop()`` is idempotent."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process, grace=30)


def start_api_server(env: dict[str, str], log_path: Path, *extra_args: str) -> ApiServer:
    """Start ``python -m qkit.cli serve`` (default host) on a free port; ready when /api/health answers 200."""
    for _ in range(3):  # a port picked as free can be taken before the server binds it
        port = free_port()
        with open(log_path, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "qkit.cli", "serve", "--port", str(port), *extra_args],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = ApiServer(process, port, log_path)
        try:
            wait_until(lambda: httpx.get(f"{server.url}/api/health", timeout=5).status_code == 200, 60,
                       f"qkit serve on port {port}", interval=0.05, process=process)
            return server
        except RuntimeError:  # exited (port taken?) or timed out: try again on another port
            server.stop()
    raise RuntimeError(f"qkit serve did not become healthy:\n{log_path.read_text(errors='replace')[-3000:]}")


#: the caller's settings a test server must not inherit
SCRUBBED = ("QKIT_", "UPSTASH_", "QSTASH_", "WORKER_SECRET")


def serve_home(home: Path, log_path: Path, **env_extra: str) -> ApiServer:
    """``qkit serve`` on ``QKIT_HOME=home`` with ``env_extra`` and none of this process's qkit, Upstash or
    QStash settings."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    return start_api_server({**env, "QKIT_HOME": str(home), **env_extra}, log_path)


#: Debian's chromium: Playwright's own browser download cannot work here
CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Debian chromium driven by Playwright (the browser tests' fixture)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()

"""What the dashboard's two test modules share: ``qkit serve`` with the two tokens on the module's ``home``, a queue
on it, seeding and draining."""
from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from services import ApiServer, serve_home

# random per run, so "no token in a page" cannot pass by accident
ADMIN = "adm-" + secrets.token_hex(16)
READER = "rd-" + secrets.token_hex(16)
#: the server's public URL (a TLS proxy in front): forms posted from its pages come with this Origin
PUBLIC_URL = "https://jobs.example.test/"
#: a payload whose simulated handler always fails (into the DLQ once its attempts are spent)
FAIL = {"simulate": {"fail_rate": 1.0}}


def drain(q: Any) -> None:
    """Bursts until nothing of ``q`` is due or running (retries with back-off 0 fall due at once)."""
    for _ in range(50):
        q.work(max_seconds=10)
        counts = q.ledger.status_counts(q.name)
        if counts["due"] + counts["processing"] == 0:
            return
    raise AssertionError(f"queue {q.name} did not drain: {counts}")


def seed(home: Path, *, ok: int, failing: int) -> None:
    """``ok`` jobs completed and ``failing`` jobs in the DLQ (two failed attempts each) in queue ``default``."""
    import qkit

    with qkit.connect(home=home, backoff_base=0.0) as q:
        q.enqueue_many([{"type": "web_scraping", "payload": {"url": f"https://ok/{i}"}} for i in range(ok)])
        q.enqueue_many([{"type": "ai_text_generation", "payload": {"n": i, **FAIL}, "max_attempts": 2}
                        for i in range(failing)])
        drain(q)


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[ApiServer]:
    """``qkit serve`` on the module's ``home`` with ``QKIT_API_TOKEN`` (admin), ``QKIT_API_READ_TOKEN`` and
    ``QKIT_API_PUBLIC_URL``."""
    srv = serve_home(home, home.parent / "serve.log", QKIT_API_TOKEN=ADMIN, QKIT_API_READ_TOKEN=READER,
                     QKIT_API_PUBLIC_URL=PUBLIC_URL)
    yield srv
    srv.stop()


@pytest.fixture()
def queue(home: Path) -> Iterator[Any]:
    """Queue ``default`` of the module's ``home``, opened by the test process (the server's Redis and ledger)."""
    import qkit

    with qkit.connect(home=home, backoff_base=0.0) as q:
        yield q


@contextlib.contextmanager
def sign_in(url: str, token: str) -> Iterator[httpx.Client]:
    """A client with a session of ``token``."""
    with httpx.Client(base_url=url, timeout=60) as client:
        reply = client.post("/login", data={"token": token, "next": "/jobs"})
        assert reply.status_code == 303 and reply.headers["location"] == "/jobs", reply.text
        yield client

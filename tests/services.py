"""A real PostgreSQL cluster for the test suite (redis-server: ``redis_servers.py``).

``start_postgres`` is :func:`qkit.devservers.start_postgres` (shared with
``bench/``): a throw-away cluster in a temporary folder, waited for by polling,
stopped at the end.  When ``QKIT_TEST_DATABASE_URL`` is set, ``conftest.py``
uses that server instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qkit.devservers import start_postgres

__all__ = ["Server", "start_postgres"]


@dataclass
class Server:
    """What a fixture hands out for any server, started here or given by the environment."""

    url: str
    port: int
    stop: Callable[[], None] = field(repr=False)

"""The backend adapter: the only door between qkit and a Redis server.

Every job state change in Redis is one Lua script from ``qkit/lua``; a
backend only has to run a named script (EVALSHA, falling back to EVAL when the
server does not know the script yet) and, for read-only helpers, a pipeline of
plain commands.  The Upstash REST backend is one more subclass of
:class:`Backend`, not a fork.

Each backend counts what it sends, because on Upstash every command is a
billed HTTP request: ``commands`` counts Redis commands (an EVALSHA is one),
``requests`` counts round trips (a pipeline of ten commands is one request).
"""
from __future__ import annotations

import abc
import threading
from typing import Any, Sequence

from qkit.lua import Script, load_script


class WakeListener(abc.ABC):
    """A subscription a sleeping worker blocks on; no command is sent while it waits."""

    @abc.abstractmethod
    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Block until a message arrives (True), ``timeout`` seconds pass or ``stop`` is set (False)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unsubscribe and drop the connection."""


class Backend(abc.ABC):
    """A Redis-speaking server reachable by scripts and pipelines."""

    #: a short name for messages and stats: "embedded", "redis", "upstash"
    kind: str = "redis"

    def __init__(self) -> None:
        self._count_lock = threading.Lock()
        self.commands = 0
        self.requests = 0

    # ------------------------------------------------------------------ counting
    def _count(self, commands: int, requests: int = 1) -> None:
        with self._count_lock:
            self.commands += commands
            self.requests += requests

    def counters(self) -> dict[str, int]:
        """Commands and requests sent so far by this backend object."""
        return {"commands": self.commands, "requests": self.requests}

    # ------------------------------------------------------------------ interface
    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the script ``qkit/lua/<name>.lua`` atomically on the server.

        Arguments are sent as strings.  Replies keep RESP2 shapes with strings
        decoded as UTF-8 text (integers stay ``int``, nil is ``None``).
        """
        return self.run_script(load_script(name), list(keys), [str(a) for a in args])

    @abc.abstractmethod
    def run_script(self, script: Script, keys: list[str], args: list[str]) -> Any:
        """Run one script: EVALSHA, then EVAL if the server answers NOSCRIPT."""

    @abc.abstractmethod
    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send several read-only commands in one round trip; return their replies."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the server answers; raises BackendUnavailable otherwise."""

    def wake_listener(self, channel: str) -> "WakeListener | None":
        """A subscription to ``channel`` that a sleeping worker waits on, or None where the backend has no
        push channel (Upstash's REST API): that worker polls instead (docs/semantics.md#long-running-workers)."""
        return None

    def describe(self) -> str:
        """Where this backend points, with any secret redacted."""
        return self.kind

    def close(self) -> None:
        """Release connections; the server itself keeps running."""

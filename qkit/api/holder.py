"""The served queue, opened once on first use, and read-only views of the other queues of its ledger.

``app.state.queue`` holds a :class:`QueueHolder`; a route gets the served queue
with :func:`served` and another queue (``?queue=Q`` of the overview routes)
with :func:`queue_named`, which shares the served queue's Redis client and
ledger instead of opening new ones.
"""
from __future__ import annotations

import threading
from typing import Any

from starlette.requests import Request

from qkit.config import Settings


class QueueHolder:
    """Opens the queue on first use (and again after a failed open), once, across threads."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self._queue: Any = None
        self._others: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    from qkit.engine.queue import Queue

                    self._queue = Queue(self.name, self.settings)
        return self._queue

    def named(self, name: str) -> Any:
        """Queue ``name`` on the served queue's backend and ledger (the served queue itself for its name)."""
        served = self.get()
        if name == self.name:
            return served
        with self._lock:
            other = self._others.get(name)
            if other is None or other.ledger is not served.ledger:
                from qkit.engine.queue import Queue

                other = self._others[name] = Queue(name, self.settings, backend=served.backend,
                                                   ledger=served.ledger)
        return other

    def discard(self) -> None:
        """Forget the queue after a backend failure; the next :meth:`get` opens a new one.

        Not closed here: a burst in another thread may still be using it (and
        may well succeed); its connections go with the last reference.
        """
        with self._lock:
            self._queue = None
            self._others.clear()

    def close(self) -> None:
        with self._lock:
            self._others.clear()
            if self._queue is not None:
                self._queue.close()
                self._queue = None


def holder(request: Request) -> QueueHolder:
    """The app's :class:`QueueHolder`."""
    return request.app.state.queue

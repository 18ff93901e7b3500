"""SIGTERM and SIGINT as a request to stop, for a worker burst and a scheduled run.

:class:`StopSignals` routes both signals to one callback while installed and
puts the previous handlers back on :meth:`StopSignals.restore`.  Handlers can
only be set from the main thread: elsewhere installing does nothing (an
embedding application keeps its own handling).
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable

#: the signals that ask a burst or a run to stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Call ``on_stop(signum)`` on SIGTERM or SIGINT between :meth:`install` and :meth:`restore`."""

    def __init__(self, on_stop: Callable[[int], None]) -> None:
        self._on_stop = on_stop
        self.previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        """Install the handler (main thread only); remembers what it replaced."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self._on_stop(signum)

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for sig, handler in self.previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        self.previous.clear()

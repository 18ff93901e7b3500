"""qkit's logger, whose calls never raise.

A log sink that fails (a full disk, a closed pipe, a handler with a bug) must
not stop a retry from being scheduled or a ledger write from happening: Sidekiq
lost retries to a logger raising ENOSPC (sidekiq#3979).
"""
from __future__ import annotations

import logging
from typing import Any


class NeverRaises(logging.LoggerAdapter):
    """A logger adapter that swallows whatever its handlers raise."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().log(level, msg, *args, **kwargs)
        except Exception:  # noqa: BLE001 - logging is never worth a lost job
            pass


log = NeverRaises(logging.getLogger("qkit"), {})

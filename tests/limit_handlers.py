"""Handlers of the limits tests (tests/test_limits.py), imported by worker processes through QKIT_HANDLERS."""
from __future__ import annotations

import time

import qkit


@qkit.handler("lim-work", timeout=30)
def lim_work(payload: dict) -> None:
    """A call to a rate-limited service: a few ms of waiting."""
    time.sleep(float(payload.get("sleep", 0.002)))


@qkit.handler("lim-free", timeout=30)
def lim_free(payload: dict) -> None:
    """A type without a limit: nothing to do, or ``sleep`` seconds of it."""
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))

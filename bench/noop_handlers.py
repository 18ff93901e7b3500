"""Handlers for the benchmarks, loaded by workers with ``QKIT_HANDLERS=noop_handlers``.

``noop`` does nothing, so a run measures qkit's own cost per job.  ``sleep``
waits ``payload["ms"]`` milliseconds (default 20), standing in for an
I/O-bound job (an HTTP call), to show that ``concurrency`` overlaps waits.
"""
from __future__ import annotations

import asyncio
import time

import qkit


@qkit.handler("noop", timeout=60)
def noop(payload: dict) -> None:
    """Nothing at all: the job's cost is the queue's."""
    return None


@qkit.handler("sleep", timeout=60)
def sleep(payload: dict) -> None:
    """Block ``payload['ms']`` ms without using the CPU (releases the GIL, like network I/O)."""
    time.sleep(float(payload.get("ms", 20)) / 1000.0)


@qkit.handler("stamp", timeout=60)
def stamp(payload: dict) -> dict:
    """Its start time as its result (``bench/latency.py``'s probe): ``t`` on the wall clock (s since the epoch),
    ``ns`` on ``perf_counter_ns`` (CLOCK_MONOTONIC on Linux, comparable across processes: ``--trace``)."""
    return {"t": time.time(), "ns": time.perf_counter_ns()}


@qkit.handler("asleep", timeout=60)
async def asleep(payload: dict) -> None:
    """``sleep`` as a coroutine: ``asyncio.sleep`` on the burst's event loop (async I/O)."""
    await asyncio.sleep(float(payload.get("ms", 20)) / 1000.0)

"""``async def`` handlers for tests/test_async_handlers.py, imported by workers through QKIT_HANDLERS.

Like ``job_handlers``, every side effect is a line of a log file named in the
payload (``what job_id attempt pid``, read with ``job_handlers.read_log``).
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import qkit


def _log(payload: dict, what: str) -> None:
    ctx = qkit.current_job()
    with open(payload["log"], "a") as fh:
        fh.write(f"{what} {ctx.id} {ctx.attempt} {os.getpid()}\n")


@qkit.handler("aio_record", timeout=60)
async def aio_record(payload: dict) -> dict:
    """Logs start and done; may wait for a release file, sleep, or fail its first attempts.

    Returns the job ``current_job()`` names after the awaits, in the coroutine and in a
    thread it hands work to: another coroutine's job would show there if they shared it."""
    _log(payload, "start")
    if payload.get("wait_for"):
        while not Path(payload["wait_for"]).exists():
            await asyncio.sleep(0.01)
    if payload.get("sleep"):
        await asyncio.sleep(float(payload["sleep"]))
    seen = qkit.current_job()
    in_thread = await asyncio.to_thread(lambda: qkit.current_job().id)
    if seen.attempt <= int(payload.get("fail_until", 0)):
        raise RuntimeError(f"attempt {seen.attempt} fails on purpose")
    _log(payload, "done")
    return {"seen": seen.id, "in_thread": in_thread, "attempt": seen.attempt}


async def _until_cancelled(payload: dict) -> None:
    """Logs start, awaits forever; logs ``cancelled`` when cancelled, and re-raises."""
    _log(payload, "start")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        _log(payload, "cancelled")
        raise


@qkit.handler("aio_hang", timeout=0.5)
async def aio_hang(payload: dict) -> None:
    """Awaits forever: the worker cancels it at its timeout."""
    await _until_cancelled(payload)


@qkit.handler("aio_stubborn", timeout=0.5)
async def aio_stubborn(payload: dict) -> str:
    """Swallows its cancellation and goes on for ``linger`` s before it returns."""
    try:
        await _until_cancelled(payload)
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(float(payload.get("linger", 1.5)))
    _log(payload, "done")
    return "too late"


@qkit.handler("aio_block", timeout=30)
async def aio_block(payload: dict) -> None:
    """Blocks the event loop (a sync sleep inside ``async def``) for ``block`` s."""
    _log(payload, "start")
    time.sleep(float(payload["block"]))
    _log(payload, "done")


@qkit.handler("aio_block_past_timeout", timeout=0.5)
async def aio_block_past_timeout(payload: dict) -> None:
    """Blocks the event loop for ``block`` s, past its own timeout."""
    _log(payload, "start")
    time.sleep(float(payload["block"]))
    _log(payload, "done")


@qkit.handler("aio_directed", timeout=30)
async def aio_directed(payload: dict) -> str:
    """Reports progress, then does what ``payload["do"]`` says on its first attempt: ``retry`` after
    ``after`` s (qkit.Retry), ``permanent`` (qkit.Permanent), or returns."""
    job = qkit.current_job()
    job.progress(0.5, "half way")
    await asyncio.sleep(0.01)
    if job.attempt == 1 and payload.get("do") == "retry":
        raise qkit.Retry(after=float(payload["after"]), reason="upstream said later")
    if payload.get("do") == "permanent":
        raise qkit.Permanent("this input can never work")
    job.progress(1.0, "done")
    return "ok"


@qkit.handler("aio_cancellable", timeout=60)
async def aio_cancellable(payload: dict) -> dict:
    """Awaits in small steps until its cancel is requested (or a minute passes)."""
    _log(payload, "start")
    job = qkit.current_job()
    deadline = time.monotonic() + 60
    while not job.cancel_requested and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    _log(payload, "done")
    return {"stopped_early": job.cancel_requested}


class _Client:
    """A handler object whose ``__call__`` is a coroutine function."""

    async def __call__(self, payload: dict) -> dict:
        await asyncio.sleep(0.01)
        return {"seen": qkit.current_job().id}


qkit.handler("aio_callable", timeout=30)(_Client())

"""The handler registry and the four simulated handlers (docs/semantics.md#interfaces).

Handlers come from an allow-list keyed by type name: ``@qkit.handler`` in
this process, or modules named in ``QKIT_HANDLERS``.  Nothing in a payload
can choose which code runs.
"""
from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Iterable

from qkit.engine.backoff import unit_hash
from qkit.errors import ConfigError

DEFAULT_TIMEOUT = 300.0
#: a progress note longer than this is cut (characters)
MAX_PROGRESS_NOTE = 500


@dataclass(frozen=True)
class Handler:
    type: str
    func: Callable[[dict], Any]
    timeout: float
    #: an ``async def`` handler: runs on the burst's event loop (:mod:`qkit.engine.aio`)
    is_async: bool = False


@dataclass(frozen=True)
class JobContext:
    """What a running handler may ask about its job: ``qkit.current_job()``."""

    id: int
    type: str
    attempt: int
    max_attempts: int
    queue: str
    worker: str
    #: where progress reports go (the burst's qkit.engine.progress.ProgressBoard); None: nowhere
    reporter: Callable[[float, str | None], None] | None = field(default=None, repr=False, compare=False)

    def progress(self, fraction: float, note: str | None = None) -> None:
        """Report how far this attempt is, 0..1, with an optional short note (docs/semantics.md#progress).

        Never waits on the database: the burst writes the latest report at most
        once per second per job, and the last one when the attempt ends.  It is
        shown by ``qkit job``, ``Queue.get`` and ``debug_job``.  A note longer than
        :data:`MAX_PROGRESS_NOTE` characters is cut.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"progress must be a number from 0 to 1 (got {type(fraction).__name__} {fraction!r:.40})")
        if note is not None and not isinstance(note, str):
            raise TypeError(f"a progress note must be a str or None (got {type(note).__name__})")
        if self.reporter is not None:
            self.reporter(float(fraction), None if note is None else note[:MAX_PROGRESS_NOTE])

    #: the worker's set of held job ids whose cancel was requested (it learns them at lease renewals)
    cancel_ids: AbstractSet[int] = field(default=frozenset(), repr=False, compare=False)

    @property
    def cancel_requested(self) -> bool:
        """True once ``q.cancel`` was asked for this job while it runs: a cooperative handler stops early.
        The job ends ``cancelled`` however the handler returns (docs/semantics.md#cancel-pause-promote)."""
        return self.id in self.cancel_ids


class LazyContext:
    """A running job's :class:`JobContext`, built on the first ``current_job()``: most handlers never ask,
    and a frozen dataclass costs about half a microsecond to build, once per job of a burst."""

    __slots__ = ("_args", "_ctx")
    _lock = threading.Lock()

    def __init__(self, id: int, type: str, attempt: int, max_attempts: int, queue: str, worker: str,
                 reporter_of: Callable[[Any], Callable[[float, str | None], None]], job: Any,
                 cancel_ids: AbstractSet[int]) -> None:
        """``reporter_of(job)`` makes the context's reporter (:meth:`qkit.engine.progress.ProgressBoard.reporter`)."""
        self._args = (id, type, attempt, max_attempts, queue, worker, reporter_of, job, cancel_ids)
        self._ctx: JobContext | None = None

    def get(self) -> JobContext:
        """The context, the same object every time (a handler's own threads may ask at once)."""
        if self._ctx is None:
            with self._lock:
                if self._ctx is None:
                    id, type, attempt, max_attempts, queue, worker, reporter_of, job, cancel_ids = self._args
                    self._ctx = JobContext(id, type, attempt, max_attempts, queue, worker, reporter_of(job),
                                           cancel_ids)
        return self._ctx


_registry: dict[str, Handler] = {}
_current: contextvars.ContextVar[JobContext | LazyContext | None] = contextvars.ContextVar("qkit_job", default=None)


def handler(type: str, timeout: float = DEFAULT_TIMEOUT) -> Callable[[Callable], Callable]:
    """Register the decorated function as the handler of jobs of ``type``.

    ``timeout`` (seconds) bounds one attempt; past it the attempt counts as
    ``timeout`` and is retried like a failure.  An ``async def`` handler runs
    on the burst's event loop and is cancelled at its timeout
    (docs/semantics.md#async-handlers).
    """
    from qkit.model import check_name

    check_name(type, "handler type")
    if not timeout > 0:
        raise ValueError("timeout must be > 0 seconds")

    def register(func: Callable) -> Callable:
        is_async = inspect.iscoroutinefunction(func) or (  # an object with ``async def __call__`` too
            not inspect.isroutine(func) and inspect.iscoroutinefunction(getattr(func, "__call__", None)))
        _registry[type] = Handler(type, func, float(timeout), is_async)
        return func

    return register


def get_handler(type: str) -> Handler | None:
    return _registry.get(type)


def registered_types() -> list[str]:
    return sorted(_registry)


def import_handler_modules(modules: Iterable[str]) -> None:
    """Import each module of ``QKIT_HANDLERS`` so its handlers register."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"QKIT_HANDLERS names {name!r}, which cannot be imported: {exc}") from None


def current_job() -> JobContext | None:
    """The job the calling handler is running, or None outside a handler."""
    ctx = _current.get()
    return ctx.get() if type(ctx) is LazyContext else ctx


def run_in_context(ctx: JobContext | LazyContext, func: Callable[[dict], Any], payload: dict) -> Any:
    token = _current.set(ctx)
    try:
        return func(payload)
    finally:
        _current.reset(token)


async def run_async_in_context(ctx: JobContext | LazyContext, func: Callable[[dict], Any], payload: dict) -> Any:
    """Await an ``async def`` handler with ``current_job()`` set inside its own task.

    Each asyncio task runs in a copy of the context it was created in, so the
    value set here is seen by this coroutine (and what it awaits or hands to
    ``asyncio.to_thread``) only, never by the other jobs on the same loop."""
    token = _current.set(ctx)
    try:
        return await func(payload)
    finally:
        _current.reset(token)


def run_to_end(ctx: JobContext, handler: Handler, payload: dict) -> Any:
    """Run a handler once, here, whatever its kind (``debug_job``'s rerun).

    An async handler gets an event loop of its own; when this thread already
    runs one (a Jupyter kernel), on a helper thread."""
    if not handler.is_async:
        return run_in_context(ctx, handler.func, payload)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_async_in_context(ctx, handler.func, payload))
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = asyncio.run(run_async_in_context(ctx, handler.func, payload))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="qkit-rerun")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


# ---------------------------------------------------------------- simulations

class SimulatedFailure(RuntimeError):
    """A failure the simulation chose (payload ``simulate.fail_rate``)."""


class SimulatedTimeout(TimeoutError):
    """A timeout the simulation chose (payload ``simulate.timeout_rate``)."""


def _simulate(kind: str, payload: dict) -> dict[str, Any]:
    """Shared behaviour of the simulated handlers: deterministic per (job id, attempt).

    ``payload["simulate"] = {"fail_rate": 0..1, "latency_ms": int, "timeout_rate": 0..1}``
    """
    sim = payload.get("simulate") or {}
    ctx = current_job()
    job_id, attempt = (ctx.id, ctx.attempt) if ctx else (0, 1)
    latency_ms = float(sim.get("latency_ms", 0) or 0)
    if latency_ms > 0:
        time.sleep(latency_ms / 1000)
    roll = unit_hash(kind, job_id, attempt)
    timeout_rate = float(sim.get("timeout_rate", 0) or 0)
    fail_rate = float(sim.get("fail_rate", 0) or 0)
    if roll < timeout_rate:
        raise SimulatedTimeout(f"{kind}: simulated upstream timeout on attempt {attempt}")
    if roll < timeout_rate + fail_rate:
        raise SimulatedFailure(f"{kind}: simulated upstream error 503 on attempt {attempt}")
    return {"simulated": kind, "attempt": attempt, "latency_ms": latency_ms}


@handler("ai_text_generation", timeout=120)
def ai_text_generation(payload: dict) -> dict:
    """Simulates an LLM call: returns fake text and token counts."""
    out = _simulate("ai_text_generation", payload)
    prompt = str(payload.get("prompt", ""))
    out.update(text=f"Generated text for: {prompt[:80]}", tokens=len(prompt.split()) + 42)
    return out


@handler("ai_image_generation", timeout=300)
def ai_image_generation(payload: dict) -> dict:
    """Simulates an image API call: returns a fake image URL."""
    out = _simulate("ai_image_generation", payload)
    ctx = current_job()
    out.update(image_url=f"https://images.invalid/{ctx.id if ctx else 0}.png",
               size=str(payload.get("size", "1024x1024")))
    return out


@handler("web_scraping", timeout=60)
def web_scraping(payload: dict) -> dict:
    """Simulates a scraping API call: returns a fake page summary."""
    out = _simulate("web_scraping", payload)
    url = str(payload.get("url", "https://example.org"))
    out.update(url=url, status=200, bytes=1024 + len(url) * 17)
    return out


@handler("scheduled_publish", timeout=60)
def scheduled_publish(payload: dict) -> dict:
    """Simulates publishing a post: returns a fake post id."""
    out = _simulate("scheduled_publish", payload)
    ctx = current_job()
    out.update(channel=str(payload.get("channel", "blog")), post_id=f"post-{ctx.id if ctx else 0}")
    return out


BUILTIN_TYPES = ("ai_text_generation", "ai_image_generation", "web_scraping", "scheduled_publish")

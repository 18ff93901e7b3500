"""Async handlers: one asyncio event loop per burst, up to ``concurrency`` coroutines at once.

A burst (:mod:`qkit.engine.worker`) hands the ``async def`` jobs of a batch to
its :class:`AsyncRunner`.  On the loop, which runs on a thread of its own, a
:class:`_Batch` starts the jobs in order, at most ``concurrency`` at a time,
each in its own task: ``current_job()`` is set inside the task (a context
variable, so every coroutine sees its own job) and an exception ends that
job's attempt only.

A batch of async jobs alone is *overlapped* (:meth:`AsyncRunner.overlap`): it
starts, and the burst gets the previous batch's outcomes to record while it
runs, then claims the next batch; the next starts when this one has ended,
so never more than ``concurrency`` run at once and the ledger's and Redis's
per-batch work hides behind the handlers' waits.  A batch with sync jobs runs
them on threads first (:mod:`qkit.engine.pool`), then its async jobs, and
returns when all have ended, as before.

A watcher thread per batch keeps the deadlines, as the burst's thread does
for handler threads: at a job's timeout it records the attempt as ``timeout``,
cancels the task and gives its slot to the next job, whether the handler then
stops or swallows the cancellation (it finishes alone, like an abandoned
handler thread).  No timer per job on the loop.  Lease renewal stays on the
burst's renewer thread, so a handler that blocks the loop (a sync call inside
``async def``) does not stop it; a loop still blocked a grace period after a
timeout is abandoned: the batch's jobs not yet started are released (no
attempt spent) and the next batch gets a new loop.
docs/semantics.md#async-handlers says it for users.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from qkit.config import redact
from qkit.engine.handlers import get_handler
from qkit.engine.lifecycle import Outcome, Runnable
from qkit.engine.pool import outcome_of, timeout_outcome
from qkit.ledger import utcnow

if TYPE_CHECKING:
    from qkit.engine.worker import Worker

#: a loop that has not cancelled a timed-out job this long after being told is blocked
GRACE_S = 1.0


def split_async(batch: Iterable[Runnable]) -> tuple[list[Runnable], list[Runnable]]:
    """(the jobs whose handler is ``async def``, the others), each in batch order."""
    aio: list[Runnable] = []
    rest: list[Runnable] = []
    for job in batch:
        handler = get_handler(job.type)
        (aio if handler is not None and handler.is_async else rest).append(job)
    return aio, rest


@dataclass(slots=True)
class _Running:
    job: Runnable
    deadline: float  # monotonic
    timeout: float
    task: "asyncio.Task[None]"


class _Batch:
    """One batch's async jobs: started on the loop (:meth:`drive`), their deadlines kept by a watcher
    thread (:meth:`watch`).  Every job gets exactly one outcome, whichever side records it first."""

    def __init__(self, worker: "Worker", jobs: list[Runnable], limit: int) -> None:
        self.worker = worker
        self.jobs = jobs
        self.limit = max(1, limit)
        self.cond = threading.Condition()
        self.outcomes: dict[int, Outcome] = {}  # index in jobs -> outcome
        self.running: dict[int, _Running] = {}  # started, no outcome yet
        self.abandoned = False  # the loop is blocked: start nothing more
        self.wake_at = 0.0  # when the watcher looks at the deadlines next (monotonic)
        self.giving_up: dict[int, float] = {}  # timed out, not yet cancelled by the loop: when told
        self._slots: asyncio.Semaphore | None = None
        self._freed: set[int] = set()
        # the loop keeps weak references to tasks only: running's entry holds each until its outcome is in,
        # this set those given up at their timeout until they end
        self._given_up: set[asyncio.Task[None]] = set()
        self.driver: list[asyncio.Task[None]] = []  # a strong reference to drive()'s task
        self.started_at = time.monotonic()
        self.seconds = 0.0  # from start to the last outcome

    def _record(self, i: int, outcome: Outcome) -> None:
        """Keep the first outcome of job ``i`` (caller holds :attr:`cond`)."""
        if i in self.outcomes:
            return
        self.outcomes[i] = outcome
        self.running.pop(i, None)
        if len(self.outcomes) == len(self.jobs):
            self.seconds = time.monotonic() - self.started_at
            self.cond.notify_all()

    # ------------------------------------------------------------------ on the loop's thread
    async def drive(self) -> None:
        """Start the jobs in order, each when a slot is free."""
        self._slots = slots = asyncio.Semaphore(self.limit)
        loop = asyncio.get_running_loop()
        i = -1
        try:
            for i, job in enumerate(self.jobs):
                await slots.acquire()
                with self.cond:
                    if self.abandoned:
                        return
                    if not self.worker._may_start():
                        self._record(i, Outcome(job, "released", utcnow()))
                        slots.release()
                        continue
                    prepared = self.worker._prepare(job)
                    if isinstance(prepared, Outcome):
                        self._record(i, prepared)
                        slots.release()
                        continue
                    call, timeout = prepared
                    deadline = time.monotonic() + timeout
                    task = loop.create_task(self._attempt(i, job, call))
                    self.running[i] = _Running(job, deadline, timeout, task)
                    if deadline < self.wake_at:  # sooner than the watcher will look
                        self.cond.notify_all()
        except asyncio.CancelledError:  # the loop stops: this batch was abandoned
            return
        except BaseException as exc:  # noqa: BLE001 - a bug around a handler call: end the batch
            with self.cond:
                if 0 <= i < len(self.jobs) and i not in self.running:
                    self._record(i, Outcome(self.jobs[i], "failed", utcnow(),
                                            error=redact(f"InternalError: {type(exc).__name__}: {exc}")))
                self._release_unstarted()

    async def _attempt(self, i: int, job: Runnable, call: Callable[[], Any]) -> None:
        result, exc = None, None
        try:
            result = await call()
        except BaseException as err:  # noqa: BLE001 - the attempt's outcome, this job's only
            exc = err
        outcome = outcome_of(job, result, exc)
        with self.cond:
            if i in self.running:  # else the watcher recorded its timeout
                self._record(i, outcome)
        self._free(i)

    def _free(self, i: int) -> None:
        if i not in self._freed and self._slots is not None:
            self._freed.add(i)
            self._slots.release()

    def _give_up(self, i: int, task: "asyncio.Task[None]") -> None:
        """The burst's thread recorded job ``i`` as timed out: cancel it and give its slot to the next job."""
        with self.cond:
            self.giving_up.pop(i, None)
        if not task.done():
            self._given_up.add(task)
            task.add_done_callback(self._given_up.discard)
            task.cancel()
        self._free(i)

    # ------------------------------------------------------------------ on the burst's thread
    def _release_unstarted(self) -> None:
        for i, job in enumerate(self.jobs):
            if i not in self.outcomes and i not in self.running:
                self._record(i, Outcome(job, "released", utcnow()))

    def watch(self, loop: "_EventLoop") -> None:
        """Until every job has its outcome: record each timeout at its deadline (the watcher thread)."""
        with self.cond:
            while len(self.outcomes) < len(self.jobs):
                now = time.monotonic()
                if not loop.thread.is_alive():  # cannot happen unless the loop itself broke: end the batch
                    loop.blocked = True
                    for i, r in list(self.running.items()):
                        self._record(i, Outcome(r.job, "failed", utcnow(),
                                                error="InternalError: the event loop of async handlers stopped"))
                    self._release_unstarted()
                    break
                for i, r in [(i, r) for i, r in self.running.items() if now >= r.deadline]:
                    self._record(i, timeout_outcome(r.job, r.timeout))
                    self.giving_up[i] = now
                    loop.call(self._give_up, i, r.task)
                if not self.abandoned and any(now - told >= GRACE_S for told in self.giving_up.values()):
                    # the loop has not run our cancel: a handler blocks it
                    self.abandoned = loop.blocked = True
                    self._release_unstarted()
                if len(self.outcomes) == len(self.jobs):
                    break
                first = min([*(r.deadline for r in self.running.values()),
                             *(told + GRACE_S for told in self.giving_up.values())], default=now + GRACE_S)
                self.wake_at = min(max(first, now + 0.001), now + GRACE_S / 2)
                self.cond.wait(self.wake_at - now)

    def wait(self) -> list[Outcome]:
        """The outcomes in batch order, once every job has one."""
        with self.cond:
            while len(self.outcomes) < len(self.jobs):
                self.cond.wait()
        return [self.outcomes[i] for i in range(len(self.jobs))]


class _EventLoop:
    """An asyncio event loop running on a daemon thread of its own."""

    def __init__(self) -> None:
        self.blocked = False
        self.loop = asyncio.new_event_loop()
        # our own default executor (asyncio.to_thread): shut down without waiting at the end
        self.executor = cf.ThreadPoolExecutor(thread_name_prefix="qkit-aio-thread")
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self._run, daemon=True, name="qkit-aio")
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:  # what is left was given up on (its outcome is recorded): cancel it, briefly wait
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=GRACE_S))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.loop.close()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed: nothing left to tell it
            pass

    def start(self, batch: _Batch) -> None:
        """Start the batch on the loop, and its watcher thread."""
        self.call(lambda: batch.driver.append(self.loop.create_task(batch.drive())))
        threading.Thread(target=batch.watch, args=(self,), daemon=True, name="qkit-aio-watch").start()

    def stop(self, wait: bool) -> None:
        self.call(self.loop.stop)
        if wait:
            self.thread.join(GRACE_S * 2)


class AsyncRunner:
    """The async side of one burst: its event loop, made on first use, replaced when one is blocked."""

    def __init__(self) -> None:
        self._loop: _EventLoop | None = None
        self._batch: _Batch | None = None  # started by overlap(), outcomes not yet handed back

    @property
    def in_flight(self) -> bool:
        return self._batch is not None

    def overlap(self, worker: "Worker", jobs: list[Runnable], limit: int) -> tuple[list[Outcome], float | None]:
        """Start ``jobs`` (async handlers, up to ``limit`` at once) once the batch in flight has ended,
        and return that batch's outcomes and its seconds per job per slot (None: no batch was in flight)."""
        done, per_job = [], None
        if self._batch is not None:
            batch, self._batch = self._batch, None
            done = batch.wait()
            per_job = batch.seconds / len(batch.jobs) * batch.limit
        if jobs:
            self._batch = _Batch(worker, jobs, limit)
            self._event_loop().start(self._batch)
        return done, per_job

    def run(self, worker: "Worker", jobs: list[Runnable], limit: int) -> list[Outcome]:
        """Run ``jobs`` (async handlers) with up to ``limit`` at once; their outcomes in order."""
        batch = _Batch(worker, jobs, limit)
        self._event_loop().start(batch)
        return batch.wait()

    def _event_loop(self) -> _EventLoop:
        if self._loop is not None and self._loop.blocked:
            self._loop.stop(wait=False)  # it stops once its handler lets go
            self._loop = None
        if self._loop is None:
            self._loop = _EventLoop()
        return self._loop

    def close(self) -> None:
        """Stop the loop: what still runs is cancelled (its outcome is not recorded: its lease expires)."""
        self._batch = None
        if self._loop is not None:
            self._loop.stop(wait=not self._loop.blocked)
            self._loop = None

"""Running handlers: the handler threads, their timeouts, and the processes an abandoned handler started.

A burst (:mod:`qkit.engine.worker`) runs a batch either on a :class:`HandlerPool`
(concurrent handlers) or on its :class:`SerialRunner` (one thread kept for the burst, in order).
Either way a handler that passes its timeout is abandoned, not awaited: its
thread finishes alone, its outcome is recorded as a timeout, and the processes
it started are killed (:func:`kill_children_of`).
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import os
import queue as queue_mod
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

from qkit.config import redact
from qkit.engine.lifecycle import Outcome, Runnable, directive
from qkit.errors import QkitError
from qkit.ledger import utcnow
from qkit.logs import log
from qkit.model import MAX_PAYLOAD_BYTES, compact_json

if TYPE_CHECKING:
    from qkit.engine.worker import Worker


class _Slot(threading.Thread):
    """A handler thread.  Retired (and replaced) when its handler overruns its timeout."""

    def __init__(self, tasks: "queue_mod.Queue[Any]") -> None:
        super().__init__(daemon=True, name="qkit-handler")
        self.tasks = tasks
        self.retired = False

    def run(self) -> None:
        while not self.retired:
            item = self.tasks.get()
            if item is None:
                return
            future, fn = item
            future.slot = self
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - reported as the attempt's outcome
                future.set_exception(exc)


class HandlerPool:
    """``size`` threads running handlers; a stuck thread is abandoned, not awaited."""

    def __init__(self, size: int) -> None:
        self.tasks: queue_mod.Queue[Any] = queue_mod.Queue()
        self.size = size
        self.slots: list[_Slot] = []  # started on the first submit: a queue of async jobs needs none
        self._runner: SerialRunner | None = None

    def _spawn(self) -> _Slot:
        slot = _Slot(self.tasks)
        slot.start()
        return slot

    def submit(self, fn: Callable[[], Any]) -> cf.Future:
        if not self.slots:
            self.slots = [self._spawn() for _ in range(self.size)]
        future: cf.Future = cf.Future()
        self.tasks.put((future, fn))
        return future

    def abandon(self, future: cf.Future) -> None:
        """Give up on a running handler: its thread finishes alone, a new one takes its place."""
        slot = getattr(future, "slot", None)
        if slot is not None and slot in self.slots:
            slot.retired = True
            self.slots.remove(slot)
            self.slots.append(self._spawn())

    def runner(self, worker: "Worker") -> "SerialRunner":
        """The thread that runs batches in order (concurrency 1), kept from batch to batch; a new one
        after it was abandoned to a handler past its timeout."""
        if self._runner is None or not self._runner.usable:
            self._runner = SerialRunner(worker)
        return self._runner

    def close(self) -> None:
        for _ in self.slots:
            self.tasks.put(None)
        if self._runner is not None:
            self._runner.close()


def outcome_of(job: Runnable, result: Any, exc: BaseException | None) -> Outcome:
    """The outcome of a handler that returned ``result`` or raised ``exc``."""
    finished = utcnow()
    if exc is None:
        try:
            size = len(compact_json(result).encode("utf-8", "surrogatepass")) if result is not None else 0
        except Exception as err:  # noqa: BLE001 - TypeError, ValueError, RecursionError...
            return Outcome(job, "failed", finished,
                           error=f"BadResult: handler returned a value that is not JSON-serialisable: {err}")
        if size > MAX_PAYLOAD_BYTES:
            return Outcome(job, "failed", finished,
                           error=f"BadResult: result is {size} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES}")
        return Outcome(job, "completed", finished, result)
    error = redact(f"{type(exc).__name__}: {exc}")
    tb = redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    asked = directive(exc, finished)  # qkit.Permanent, qkit.Retry, a 429/503 Retry-After
    return Outcome(job, "timeout" if isinstance(exc, TimeoutError) else "failed", finished, error=error, traceback=tb,
                   permanent=asked.permanent, retry_after=asked.retry_after)


def run_error(exc: BaseException) -> str:
    """A burst's error as stored in ``worker_runs`` and logged: qkit's own one-line message, or only
    the exception's type (a driver's message may quote the SQL parameters, i.e. job data)."""
    if isinstance(exc, QkitError):
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {redact(first[0][:500])}" if first else type(exc).__name__
    return f"{type(exc).__name__} (the worker's exception; details are not stored as they may hold job data)"


def timeout_outcome(job: Runnable, timeout: float) -> Outcome:
    job.abandoned = True  # its handler runs on alone: its progress reports are ignored from now on
    return Outcome(job, "timeout", utcnow(), error=f"HandlerTimeout: handler exceeded its {timeout:g} s timeout")


def kill_children_of(thread: threading.Thread, since: float) -> int:
    """SIGKILL the processes that handler ``thread`` started at or after ``since`` (epoch s), with
    their descendants; returns how many.

    An abandoned handler thread cannot be killed, but the processes it started
    can: otherwise a timed-out handler's child would outlive the burst.  Other
    handlers run in the same process (concurrent handlers, other bursts of
    ``qkit serve``), so a child is told apart by the thread that forked it:
    Linux lists a thread's own children in ``/proc/<pid>/task/<tid>/children``.
    ``since`` spares what the thread's earlier jobs left running.  Where that
    file does not exist (not Linux), nothing is killed: sparing an abandoned
    handler's child is better than killing an innocent job's.
    """
    import psutil

    tid = thread.native_id
    if tid is None or not thread.is_alive():  # a finished thread's id may belong to a new thread now
        return 0
    try:
        with open(f"/proc/{os.getpid()}/task/{tid}/children") as fh:
            pids = [int(p) for p in fh.read().split()]
    except OSError:
        log.debug("cannot list the children of handler thread %s: left running", tid)
        return 0
    killed = 0
    for pid in pids:
        try:
            child = psutil.Process(pid)
            if child.create_time() < since - 1.0:  # create_time counts from a boot time rounded down to 1 s
                continue
            victims = [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in victims:
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


class SerialRunner(threading.Thread):
    """Runs batches' jobs in order on one thread, watched by the burst's thread.

    The thread is kept for the whole burst (a ``--forever`` worker's life): the burst hands it each batch
    (:meth:`give`) and watches it (:meth:`watch`).  A thread started per batch cost about 0.1 ms per
    wake-up, and milliseconds under load (bench/README.md#latency-latencypy).  When the running handler
    passes its timeout, :meth:`watch` records a timeout and abandons this thread: it finishes that handler
    alone and ends; the rest of the batch goes to a new runner.  A runner whose batch crashed ends too.
    """

    def __init__(self, worker: "Worker") -> None:
        super().__init__(daemon=True, name="qkit-handler")
        self.worker = worker
        self.jobs: list[Runnable] = []
        self.outcomes: list[Outcome] = []
        self.current: tuple[Runnable, float, float, float] | None = None  # job, deadline, timeout, started
        self.finished = True  # True: no batch in hand
        self.abandoned = False
        self.closed = False
        self.crash: BaseException | None = None
        self.cond = threading.Condition()
        #: the deadline the watcher sleeps towards (inf: no job in hand when it last looked)
        self.watching_until = math.inf

    @property
    def usable(self) -> bool:
        """Whether it may take another batch (not abandoned to a hung handler, not crashed, not closed)."""
        return not (self.abandoned or self.closed or self.crash is not None)

    def give(self, jobs: list[Runnable]) -> None:
        """Hand over a batch (the previous one has been watched to its end)."""
        with self.cond:
            self.jobs, self.outcomes, self.current = jobs, [], None
            self.finished = False
            self.watching_until = math.inf
            self.cond.notify_all()
        if self.ident is None:
            self.start()

    def close(self) -> None:
        """The burst is over: the thread ends once idle (an abandoned one when its handler returns)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def run(self) -> None:
        while True:
            with self.cond:
                while self.finished and not self.closed:
                    self.cond.wait()
                if self.finished:
                    return  # closed while idle
            try:
                self._run_jobs()
            except BaseException as exc:  # noqa: BLE001 - a bug around a handler call; reported by watch()
                self.crash = exc
            finally:  # whatever happens, the watcher must not wait forever
                with self.cond:
                    self.finished = True
                    self.cond.notify_all()
            if self.abandoned or self.crash is not None:
                return

    def _run_jobs(self) -> None:
        for job in self.jobs:
            with self.cond:
                if self.abandoned:
                    return
                if not self.worker._may_start():
                    self.outcomes.append(Outcome(job, "released", utcnow()))
                    continue
                prepared = self.worker._prepare(job)
                if isinstance(prepared, Outcome):
                    self.outcomes.append(prepared)
                    continue
                call, timeout = prepared
                deadline = time.monotonic() + timeout
                self.current = (job, deadline, timeout, time.time())
                if deadline < self.watching_until:
                    # only a deadline sooner than the one the watcher sleeps towards wakes it: a
                    # wake-up per job would cost a thread switch per no-op job (bench/README.md#profiles)
                    self.cond.notify()
            result, exc = None, None
            try:
                result = call()
            except BaseException as err:  # noqa: BLE001 - the attempt's outcome
                exc = err
            with self.cond:
                if self.abandoned:
                    return  # the watcher already recorded this job as timed out
                self.current = None
                self.outcomes.append(outcome_of(job, result, exc))

    def watch(self) -> list[Outcome]:
        """Wait for the batch; on a handler timeout, abandon this thread and return what is known."""
        with self.cond:
            while not self.finished:
                if self.current is None:
                    self.watching_until = math.inf
                    self.cond.wait(1.0)
                    continue
                job, deadline, timeout, started = self.current
                left = deadline - time.monotonic()
                # the job in hand when it wakes may be a later one: its deadline is then looked at afresh
                self.watching_until = deadline
                if left <= 0:
                    self.abandoned = True
                    self.outcomes.append(timeout_outcome(job, timeout))
                    kill_children_of(self, started)
                    self.worker._abandoned.append((self, started))  # and again at the burst's end
                    break
                self.cond.wait(left)
            if self.crash is not None and not self.abandoned and len(self.outcomes) < len(self.jobs):
                # fail the job in hand rather than start it again and again
                self.outcomes.append(Outcome(self.jobs[len(self.outcomes)], "failed", utcnow(),
                                             error=redact(f"InternalError: {type(self.crash).__name__}: {self.crash}")))
            return self.outcomes

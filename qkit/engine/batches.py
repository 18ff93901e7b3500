"""Running one claimed batch's handlers: in order on one runner thread, on a pool of ``concurrency``
threads, or as coroutines on the burst's event loop (:mod:`qkit.engine.aio`); the outcomes go back to the
burst worker (:mod:`qkit.engine.worker`), which records and settles them.

:class:`BatchRunner` is a part of :class:`qkit.engine.worker.Worker` (a mixin): it reads the worker's
budgets, held leases, cancel requests and progress board.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import TYPE_CHECKING, Any, Callable

from qkit.engine.aio import split_async
from qkit.engine.handlers import LazyContext, get_handler, run_async_in_context, run_in_context
from qkit.engine.lifecycle import Outcome, Runnable
from qkit.engine.pool import HandlerPool, kill_children_of, outcome_of, timeout_outcome
from qkit.ledger import utcnow

if TYPE_CHECKING:
    from qkit.engine.worker import Worker


class BatchRunner:
    """How a :class:`~qkit.engine.worker.Worker` runs the handlers of one batch."""

    def _may_start(self: "Worker") -> bool:
        return not (self._stop.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)
                    or (self.max_jobs is not None and self._started >= self.max_jobs))

    def _prepare(self: "Worker", job: Runnable) -> tuple[Callable[[], Any], float] | Outcome:
        """What to run for ``job`` (and its timeout), or its outcome when it cannot run."""
        if job.id in self._cancel_ids:  # cancelled before its handler started: it never runs (ends cancelled)
            return Outcome(job, "released", utcnow())
        self._started += 1
        with self._held_lock:
            self._held[job.id] = job.attempt
        handler = get_handler(job.type)
        if handler is None:
            return Outcome(job, "failed", utcnow(), permanent=True,
                           error=f"UnknownJobType: no handler is registered for job type {job.type!r} in this worker")
        if not isinstance(job.payload, dict):
            return Outcome(job, "failed", utcnow(), permanent=True,
                           error="InvalidPayload: the stored payload is not a JSON object (written outside qkit?)")
        ctx = LazyContext(job.id, job.type, job.attempt, job.max_attempts, self.q.name, self.worker_id,
                          self._job_progress.reporter, job, self._cancel_ids)
        job.started_at = utcnow()
        run = run_async_in_context if handler.is_async else run_in_context
        return (lambda: run(ctx, handler.func, job.payload)), handler.timeout

    def _run_batch(self: "Worker", pool: HandlerPool, batch: list[Runnable]) -> list[Outcome]:
        """The outcomes of a batch's handlers; of an async-only batch, those of the one before it
        (:meth:`qkit.engine.aio.AsyncRunner.overlap`: it runs while they are recorded)."""
        async_jobs, batch = split_async(batch)
        overlap = not batch and self.max_jobs is None  # async jobs only (or none: the batch in flight ends)
        finished, per_job = self._aio.overlap(self, async_jobs if overlap else [], self.concurrency)
        self._observe(per_job)
        if overlap:
            return finished
        t_batch, started_before = time.monotonic(), self._started
        if self.concurrency == 1:
            outcomes = self._run_serial(pool, batch)
        else:
            outcomes = self._run_concurrent(pool, batch)
        if async_jobs:  # after the sync ones: never more than `concurrency` handlers at once
            outcomes += self._aio.run(self, async_jobs, self.concurrency)
        ran = self._started - started_before
        if ran:
            self._observe((time.monotonic() - t_batch) / ran * self.concurrency)
        return finished + outcomes

    def _observe(self: "Worker", per_job: float | None) -> None:
        """Fold a batch's seconds per job per slot into the estimate that sizes batches."""
        if per_job is not None:
            per_job = max(per_job, 1e-6)
            self._avg_job_s = per_job if self._avg_job_s == 0 else 0.5 * self._avg_job_s + 0.5 * per_job

    def _run_serial(self: "Worker", pool: HandlerPool, batch: list[Runnable]) -> list[Outcome]:
        """The burst's handler thread runs the batch in order; this thread only watches the clock.

        Handing each job to a thread would cost more than a no-op job; a batch at a
        time keeps timeouts enforceable at a cost paid once per batch.
        """
        outcomes: list[Outcome] = []
        while len(outcomes) < len(batch):
            runner = pool.runner(self)  # a new one after a timeout abandoned the last
            runner.give(batch[len(outcomes):])
            outcomes += runner.watch()
        return outcomes

    def _run_concurrent(self: "Worker", pool: HandlerPool, batch: list[Runnable]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        in_flight: dict[cf.Future, tuple[Runnable, float, float, float]] = {}
        todo = list(batch)
        while todo or in_flight:
            while todo and len(in_flight) < self.concurrency:
                job = todo.pop(0)
                if not self._may_start():
                    outcomes.append(Outcome(job, "released", utcnow()))
                    continue
                prepared = self._prepare(job)
                if isinstance(prepared, Outcome):
                    outcomes.append(prepared)
                    continue
                call, timeout = prepared
                in_flight[pool.submit(call)] = (job, time.monotonic() + timeout, timeout, time.time())
            if not in_flight:
                continue
            next_deadline = min(d for _, d, _, _ in in_flight.values())
            done, _ = cf.wait(list(in_flight), timeout=max(0.0, next_deadline - time.monotonic()),
                              return_when=cf.FIRST_COMPLETED)
            now_mono = time.monotonic()
            for future in list(in_flight):
                job, deadline, timeout, started = in_flight[future]
                if future in done:
                    del in_flight[future]
                    exc = future.exception()
                    outcomes.append(outcome_of(job, None if exc else future.result(), exc))
                elif now_mono >= deadline:
                    del in_flight[future]
                    pool.abandon(future)
                    outcomes.append(timeout_outcome(job, timeout))
                    slot = getattr(future, "slot", None)
                    if slot is not None:
                        kill_children_of(slot, started)
                        self._abandoned.append((slot, started))
        return outcomes

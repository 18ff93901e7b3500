"""The burst worker: claim in batches, run handlers, settle in batches, exit.

One loop iteration costs one Redis script call (settle the last batch + claim
the next, :meth:`qkit.engine.dispatch.Dispatch.claim`) and two ledger transactions
(record the claim, record the outcomes).  Leases are renewed by a background
thread while handlers run; a batch's handlers run on worker threads (:mod:`qkit.engine.batches`,
:mod:`qkit.engine.pool`) so a handler that hangs past its timeout is abandoned instead of hanging the
burst; ``async def`` handlers run on one event loop per burst (:mod:`qkit.engine.aio`).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from qkit.config import redact
from qkit.engine import faults, gcpause
from qkit.engine.aio import AsyncRunner
from qkit.engine.batches import BatchRunner
from qkit.engine.lifecycle import Settlement
from qkit.engine.progress import ProgressBoard
from qkit.engine.pool import HandlerPool, kill_children_of, run_error
from qkit.engine.signals import StopSignals
from qkit.errors import BackendUnavailable, QkitError
from qkit.ledger import transient
from qkit.logs import log
from qkit.model import WorkSummary

if TYPE_CHECKING:
    from qkit.engine.backoff import Backoff
    from qkit.engine.dispatch import Dispatch
    from qkit.ledger import Ledger


MAX_BATCH = 1000
TARGET_BATCH_SECONDS = 0.5
TRIGGERS = ("papermill", "cli", "http", "notebook")
#: ``--forever``: longest sleep without a claim when subscribed to wake-ups, and when polling (Upstash:
#: each poll is one billed command, so an idle worker costs 86400 / 5 = 17,280 commands a day at most)
IDLE_SECONDS_SUBSCRIBED, IDLE_SECONDS_POLLING = 60.0, 5.0
#: ``--forever``: an idle worker repeats a burst's start-up drift check (qkit.ops.reconcile) this often at most
RECHECK_SECONDS = 300.0
#: ``--forever``: the schedules' tick (docs/semantics.md#schedules) runs again this often, busy or idle (one SQL query)
TICK_SECONDS = 1.0
#: back-off of a live worker retrying a ledger or Redis write it could not make (seconds)
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 1.0
#: first and longest wait (ms) of a burst whose only work is held at a type's concurrency limit
HELD_POLL_MS = (10, 500)


def short_host() -> str:
    return socket.gethostname().split(".")[0][:24] or "host"


def new_worker_id() -> str:
    """Unique per burst, even for a restarted process with the same pid: ``w-<host>-<pid>-<random>``."""
    return f"w-{short_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_WORKER_ID = re.compile(r"w-(.+)-(\d+)-[0-9a-f]{8}")


def burst_process(worker_id: str) -> tuple[str, int] | None:
    """(host, pid) of the process that ran burst ``worker_id``, or None for another kind of id."""
    m = _WORKER_ID.fullmatch(worker_id or "")
    return (m.group(1), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Resources:
    """What a burst works with, handed over by the facade (:meth:`qkit.engine.queue.Queue.work`)."""

    name: str  # the queue
    ledger: "Ledger"
    dispatch: "Dispatch"
    backoff: "Backoff"
    lease_seconds: float
    #: run once before the first claim (the facade's repairs, :mod:`qkit.ops.reconcile`)
    prepare: Callable[[], Any] = lambda: None
    #: ``--forever``: the schedules' tick, again every :data:`TICK_SECONDS` (``prepare`` ran the first)
    tick: Callable[[], Any] = lambda: None


class Worker(BatchRunner):
    """One burst on one queue.  Use :meth:`qkit.engine.queue.Queue.work`."""

    def __init__(self, q: Resources, *, max_jobs: int | None = None, max_seconds: float | None = None,
                 concurrency: int = 1, trigger: str = "notebook", params: dict[str, Any] | None = None,
                 progress: Any = None, handle_signals: bool = True, forever: bool = False,
                 idle_seconds: float | None = None) -> None:
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {', '.join(TRIGGERS)}")
        if faults.ARMED:
            faults.arm()
        self.q = q
        self.max_jobs = max_jobs
        self.max_seconds = max_seconds
        self.concurrency = max(1, int(concurrency))
        self.trigger = trigger
        self.params = params or {}
        self.progress = progress
        self.handle_signals = handle_signals
        self.forever = forever
        self.idle_seconds = idle_seconds  # forever: longest sleep without a claim (None: by backend)
        self._listener: Any = None
        self._checked_at = time.monotonic()  # forever: when the drift check last ran
        self._ticked_at = time.monotonic()  # forever: when the schedules' tick last ran
        self.worker_id = new_worker_id()
        self.lease_ms = int(q.lease_seconds * 1000)
        self.summary = WorkSummary(worker=self.worker_id)
        self._held: dict[int, int] = {}  # leased to us, not yet settled in Redis: id -> attempt (0: not run)
        self._held_lock = threading.Lock()
        self._renewed: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts short a wait for delayed jobs when a signal stops the burst
        self._signal: int | None = None
        self._signals = StopSignals(self._on_stop_signal)
        self._started = 0
        self._avg_job_s = 0.0
        self._abandoned: list[tuple[threading.Thread, float]] = []  # (handler thread, job start) of timeouts
        self._leased_at = 0.0  # monotonic start of the last Redis call that granted or renewed every held lease
        self._priority: dict[int, int] = {}  # held job -> priority, to release it in place
        self._job_progress = ProgressBoard(q.ledger)  # handlers' current_job().progress() reports
        self._aio = AsyncRunner()  # the event loop of async handlers, made on first use
        self._cancel_ids: set[int] = set()  # held jobs whose cancel was requested (renew.lua tells)
        self._delayed_left = False  # the last empty claim saw delayed jobs (retries in back-off, perhaps)
        self._poll_ms = HELD_POLL_MS[0]  # next wait for a type held at its concurrency limit

    # ------------------------------------------------------------------ public
    def run(self) -> WorkSummary:
        q = self.q
        t0 = time.monotonic()
        self.deadline = t0 + self.max_seconds if self.max_seconds is not None else None
        run_id = q.ledger.start_run(self.worker_id, q.name, self.trigger,
                                    {"max_jobs": self.max_jobs, "max_seconds": self.max_seconds,
                                     "concurrency": self.concurrency, **self.params})
        self.summary.run_id = run_id
        if self.handle_signals:
            self._signals.install()
        renewer = threading.Thread(target=self._renew_loop, daemon=True, name="qkit-renewer")
        renewer.start()
        pool = HandlerPool(self.concurrency)
        status, error = "ok", None
        # what exists before the burst (modules, the engines' metadata) is not scanned by the cyclic GC
        # while it runs: about a sixth of a no-op job's CPU (bench/README.md#profiles); unfrozen at its end
        gcpause.hold()
        try:
            prepared = q.prepare()
            if isinstance(prepared, dict) and prepared.get("paused") and not self.forever:
                self.summary.stopped_by = "paused"  # the drift check's one command said so: nothing claimed
            elif self.forever:
                self._listener = q.dispatch.wake_listener()
                if self.idle_seconds is None:
                    self.idle_seconds = IDLE_SECONDS_SUBSCRIBED if self._listener else IDLE_SECONDS_POLLING
                self._loop(pool)
            else:
                self._loop(pool)
            if self._delayed_left or self.summary.retried:  # one read per burst, only when retries may wait
                try:
                    self.summary.waiting_retry, self.summary.next_retry_s = q.ledger.waiting_retries(q.name)
                except Exception as exc:  # noqa: BLE001 - only for the summary: the burst's work is done
                    log.debug("could not count the retries left waiting: %s", run_error(exc))
            if self._signal is not None:
                status = "interrupted"
        except BaseException as exc:
            status, error = "failed", run_error(exc)
            raise
        finally:
            gcpause.release()
            self._stop.set()
            if self._listener is not None:
                self._listener.close()
            pool.close()
            self._job_progress.close()
            self._aio.close()
            for thread, started in self._abandoned:  # what they started since their timeout
                kill_children_of(thread, started)
            self.summary.seconds = round(time.monotonic() - t0, 3)
            s = self.summary
            def close(_again: bool = False) -> None:
                q.ledger.finish_run(run_id, processed=s.processed, completed=s.completed, retried=s.retried,
                                    failed=s.failed, released=s.released, status=status, error=error)
            try:
                # a burst that failed (maybe after retrying a write for a lease period) tries once
                self._retrying("closing the worker run", close) if status != "failed" else close()
            except Exception as exc:  # noqa: BLE001 - the next burst closes the row as abandoned
                log.error("could not close worker run %s: %s", run_id, run_error(exc))
            self._signals.restore()
        if self._signal is not None:
            # the burst stopped cleanly; now let the signal do what its sender meant
            signal.raise_signal(self._signal)
        return self.summary

    # ------------------------------------------------------------------ loop
    def _batch_size(self) -> int:
        if self._stop.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline):
            return 0
        size = MAX_BATCH if self._avg_job_s <= 0 else int(TARGET_BATCH_SECONDS * self.concurrency / self._avg_job_s)
        if self._started == 0 or self._avg_job_s <= 0:  # (an async batch may still run: aio.overlap)
            size = max(self.concurrency, 8)  # first batch: small, until we know how long jobs take
        size = max(self.concurrency, min(MAX_BATCH, size))
        if self.max_jobs is not None:
            size = min(size, self.max_jobs - self._started)
        return max(0, size)

    def _loop(self, pool: HandlerPool) -> None:
        q, s = self.q, self.summary
        to_settle: list[Settlement] = []
        while True:
            if self.forever and time.monotonic() - self._ticked_at >= TICK_SECONDS:
                self._tick()
            want = self._batch_size()
            if want == 0 and not self._aio.in_flight:
                s.stopped_by = "signal" if self._signal else ("max_jobs" if self.max_jobs is not None
                                                               and self._started >= self.max_jobs else "max_seconds")
                break
            claim = self._redis_claim(want, to_settle)
            if faults.ARMED and (claim.claimed or claim.reclaimed):
                faults.reach("claim.after_redis")
            self._forget([x.job_id for x in to_settle])
            to_settle = []
            s.fenced += len(claim.fenced)
            if not claim.claimed and not claim.reclaimed and not self._aio.in_flight:
                if claim.paused and not self.forever:
                    s.stopped_by = "paused"
                    break
                self._delayed_left = claim.next_due_ms >= 0 and not claim.paused
                if self._wait_for_delayed(-1 if claim.paused else self._held_poll(claim)):  # forever: idle while paused
                    continue
                s.stopped_by = "empty"
                break
            self._poll_ms = HELD_POLL_MS[0]
            with self._held_lock:
                for job_id in [*claim.reclaimed, *claim.claimed]:
                    self._held[job_id] = 0
            # an attempt starts when Redis leased it, on Redis's clock (limits per type are kept on it)
            plan = self._retrying("recording the claim in the ledger", lambda again: q.ledger.claim(
                q.name, self.worker_id, claim.claimed, claim.reclaimed, q.backoff, again=again,
                now=datetime.fromtimestamp(claim.now_us / 1e6, timezone.utc)),
                to_settle, claim_in_hand=[*claim.reclaimed, *claim.claimed])
            self._priority.update((r.id, r.priority) for r in plan.runnable)
            if faults.ARMED:
                faults.reach("claim.after_ledger")
            to_settle += plan.settlements
            s.lost += plan.lost
            s.retried += plan.retried
            s.failed += plan.failed
            s.processed += plan.retried + plan.failed
            outcomes = self._run_batch(pool, plan.runnable)
            self._job_progress.finish(outcomes)
            if faults.ARMED and outcomes:
                faults.reach("complete.before_ledger")
            settled = self._retrying("recording outcomes in the ledger", lambda again: q.ledger.settle(
                self.worker_id, outcomes, q.backoff, again=again), to_settle)
            if faults.ARMED:
                faults.reach(*[point for point, n in (("complete.after_ledger", settled.completed),
                                                      ("retry.after_ledger", settled.retried),
                                                      ("dead.after_ledger", settled.failed)) if n])
            for job_id in settled.fenced:
                log.warning("job %s: outcome discarded, the lease was lost and the attempt replaced (fenced)", job_id)
            to_settle += settled.settlements
            s.fenced += len(settled.fenced)
            s.completed += settled.completed
            s.retried += settled.retried
            s.failed += settled.failed
            s.cancelled += settled.cancelled + plan.cancelled
            s.released += settled.released
            s.processed += settled.completed + settled.retried + settled.failed + settled.cancelled + plan.cancelled
            if self.progress is not None:
                self.progress.update(settled.completed + settled.retried + settled.failed)
        if to_settle:
            claim = self._redis_claim(0, to_settle)
            self._forget([x.job_id for x in to_settle])
            s.fenced += len(claim.fenced)

    def _forget(self, job_ids: list[int]) -> None:
        with self._held_lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)
                self._priority.pop(job_id, None)
                self._cancel_ids.discard(job_id)

    # ------------------------------------------------------------------ retried writes
    def _redis_claim(self, want: int, to_settle: list[Settlement]) -> Any:
        def call(_again: bool) -> Any:
            started = time.monotonic()
            claim = self.q.dispatch.claim(self.worker_id, self.lease_ms, want, to_settle)
            self._leased_at = started  # every lease we hold now was granted or kept at least this late
            return claim
        # nothing to release through a Redis that fails
        return self._retrying("the Redis claim", call, redis_call=True)

    def _retry_deadline(self, first_call: float, unknown_leases: bool) -> float:
        """Until when a failing write is retried, never past the time the leases held would expire
        (from their last renewal), less a margin: past that other workers may take the jobs over.

        A ledger write (Redis answers, the renewer keeps the leases): an outage shorter than a
        lease is ridden out (docs/semantics.md), counted from the start of the first failed call.
        A Redis claim whose answer was lost may have granted leases nobody renews: those expire a
        lease after that call began, so its retries stop a margin before then."""
        lease_s = self.lease_ms / 1000
        margin = min(lease_s / 4, 5.0)
        deadline = first_call + lease_s - (margin if unknown_leases else 0.0)
        with self._held_lock:
            holding = bool(self._held)
        if holding:
            deadline = min(deadline, self._leased_at + lease_s - margin)
        return deadline

    def _retrying(self, what: str, call: Callable[[bool], Any], to_settle: list[Settlement] | None = None,
                  claim_in_hand: list[int] = (), redis_call: bool = False) -> Any:
        """``call(again)`` until it succeeds, retrying with back-off while the ledger or Redis cannot be
        reached, for as long as :meth:`_retry_deadline` allows (the renewer keeps the leases meanwhile).

        Past it: what this burst holds is released (best effort) and BackendUnavailable raised,
        one line naming the backend.  Errors that are not about reaching a backend are not retried.
        """
        first: float | None = None
        delay = RETRY_FIRST_S
        while True:
            started = time.monotonic()
            try:
                return call(first is not None)
            except Exception as exc:
                if not transient(exc):
                    raise
                now = time.monotonic()
                # a driver's error, as one line naming the ledger (a backend's error names its variable)
                reason = (str(exc if isinstance(exc, QkitError) else self.q.ledger._unavailable(exc)).strip()
                          .split("\n")[0])
                if first is None:
                    first = started
                    log.warning("%s failed, retrying: %s", what, reason)
                left = self._retry_deadline(first, unknown_leases=redis_call) - now
                if left <= 0:
                    if to_settle is not None:
                        self._release(to_settle, claim_in_hand)
                    raise BackendUnavailable(f"gave up {what} after {now - first:.1f} s of retries: {reason}") from None
                time.sleep(min(delay, left))  # the last try comes at the bound, not a back-off step before it
                delay = min(delay * 2, RETRY_MAX_S)

    def _release(self, to_settle: list[Settlement], claim_in_hand: list[int]) -> None:
        """Best effort, on giving up: settle in Redis what the ledger settled, and put back the jobs
        held (with a known priority) so that another burst can take them without waiting for
        their leases to expire.  Jobs still open in the ledger get a ``lost`` attempt there."""
        self._aio.close()  # the async batch in flight first: none of its jobs may run once released
        with self._held_lock:
            held = [j for j in [*self._held, *claim_in_hand] if j in self._priority]
        done = {x.job_id for x in to_settle}
        back = [Settlement(j, "retry", 0, self._priority[j]) for j in dict.fromkeys(held) if j not in done]
        try:
            self.q.dispatch.claim(self.worker_id, self.lease_ms, 0, [*to_settle, *back])
        except Exception as exc:  # noqa: BLE001 - best effort: the leases expire anyway
            log.debug("could not release the jobs this burst holds: %s", run_error(exc))

    # ------------------------------------------------------------------ leases
    def _renew_loop(self) -> None:
        interval = max(0.05, self.q.lease_seconds / 3)
        failing = False  # warn once per outage, not once per tick
        while not self._stop.wait(interval):
            with self._held_lock:
                held = dict(self._held)
            if not held:
                continue
            try:
                started = time.monotonic()
                renewal = self.q.dispatch.renew(self.worker_id, self.lease_ms, list(held))
                lost = set(renewal.lost)
                self._leased_at = max(self._leased_at, started)
                with self._held_lock:  # their handlers read current_job().cancel_requested
                    self._cancel_ids.update(j for j in renewal.cancel if j in self._held)
                for job_id in lost:
                    log.warning("job %s: lease lost (reclaimed by another worker); its outcome will be fenced", job_id)
                first = [(j, a) for j, a in held.items() if a and j not in lost and (j, a) not in self._renewed]
                if first:
                    self._renewed.update(first)
                    self.q.ledger.record_renewal(self.worker_id, first)
                failing = False
            except Exception as exc:  # noqa: BLE001 - renewal retries next tick; fencing keeps outcomes safe
                if not failing:
                    log.warning("lease renewal failed (retrying): %s", redact(str(exc)))
                failing = True

    # ------------------------------------------------------------------ signals
    def _on_stop_signal(self, signum: int) -> None:
        if self._signal is not None:  # a second signal: stop now
            self._signals.restore()
            signal.raise_signal(signum)
            return
        self._signal = signum
        self._stop_claiming()
        try:  # one plain write, no logging lock: this runs between two bytecodes of the main thread
            os.write(2, f"qkit: {signal.Signals(signum).name} received: finishing the job in hand, "
                        "releasing the rest\n".encode())
        except OSError:
            pass

    def _wait_for_work(self, next_due_ms: int) -> bool:
        """``--forever``: sleep until a push publishes a wake-up, the next delayed job is due, or
        ``idle_seconds`` pass.  Subscribed, the sleep sends no command; on Upstash each wake-up costs the one
        claim call that follows.  Idle, the drift check a burst makes at its start runs again at most once
        per :data:`RECHECK_SECONDS`.  False once stopped."""
        if self._signal is not None or self._stop.is_set():
            return False
        timeout = float(self.idle_seconds or IDLE_SECONDS_POLLING)
        if next_due_ms >= 0:
            timeout = min(timeout, next_due_ms / 1000 + 0.005)  # due by Redis's clock: a hair later
        deadline = time.monotonic() + timeout
        while True:  # the schedules' tick every TICK_SECONDS meanwhile: no claim unless it enqueued something
            wait = max(0.0, min(deadline, self._ticked_at + TICK_SECONDS) - time.monotonic())
            if self._listener is not None:
                woke = self._listener.wait(wait, self._wake)
            else:
                woke = self._wake.wait(wait)
            if woke or self._signal is not None or time.monotonic() >= deadline:
                break
            if self._tick():
                woke = True
                break
        if self._signal is not None:
            return False
        if not woke and next_due_ms < 0 and time.monotonic() - self._checked_at >= RECHECK_SECONDS:
            self.q.prepare()  # idle for a while: the drift check a new burst would make
            self._checked_at = time.monotonic()
        return True

    def _tick(self) -> bool:
        """``--forever``: enqueue the schedules' due fire times; whether it enqueued any.  A failure is
        logged and waits for the next tick."""
        self._ticked_at = time.monotonic()
        try:
            return any(fired["job_ids"] for fired in self.q.tick())
        except Exception as exc:  # noqa: BLE001 - the ledger or Redis away for a moment: the next tick retries
            log.warning("queue %s: the schedules' tick failed (retried in %.0f s): %s", self.q.name, TICK_SECONDS,
                        run_error(exc))
            return False

    def _held_poll(self, claim: Any) -> int:
        """ms until the next claim may find work: a delayed job falls due or a rate limit reopens
        (the claim says when), or, for a type held at its concurrency limit (no one can say when a
        slot frees), a poll that backs off from 10 ms to 0.5 s while nothing can be claimed."""
        if not any(why == "concurrency" for _, why in claim.held.values()):
            return claim.next_due_ms
        poll, self._poll_ms = self._poll_ms, min(self._poll_ms * 2, HELD_POLL_MS[1])
        return poll if claim.next_due_ms < 0 else min(poll, claim.next_due_ms)

    def _wait_for_delayed(self, next_due_ms: int) -> bool:
        """Sleep until the next delayed job is due, if that is within this burst's time budget.

        Pending delayed jobs (retries in back-off) are still the queue's work: a burst
        with ``max_seconds`` keeps going for them, at one claim call per wake-up.
        Without a time budget a burst ends as soon as nothing is due, like RQ's.
        """
        if self.forever:
            return self._wait_for_work(next_due_ms)
        if next_due_ms < 0 or self.deadline is None or self._signal is not None:
            return False
        wake = time.monotonic() + next_due_ms / 1000 + 0.005  # due by Redis's clock: a hair later
        if wake >= self.deadline:
            return False
        self._wake.wait(wake - time.monotonic())
        return self._signal is None

    def _stop_claiming(self) -> None:
        # only the claim loop stops: the renewer keeps leases alive while the job in hand finishes
        self.deadline = time.monotonic()
        self._wake.set()

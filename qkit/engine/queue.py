"""The queue facade users and notebooks import: ``qkit.connect(queue=...)`` (docs/semantics.md#interfaces)."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping, Sequence

from qkit.engine import faults, gcpause
from qkit.backends import Backend, open_backend
from qkit.engine.backoff import Backoff
from qkit.config import DEFAULT_QUEUE, Settings, check_overrides, settings as resolve_settings
from qkit.engine.dispatch import CLOCK_SLACK, Dispatch, redis_now
from qkit.errors import BackendUnavailable, BadInput
from qkit.engine.handlers import import_handler_modules
from qkit.engine.schedules import ScheduleMethods
from qkit.ledger import Ledger, utcnow
from qkit.logs import log
from qkit.model import STATUSES, Job, NewJob, WorkSummary, check_job_id, check_name, new_job, new_job_from_item


MAX_BATCH_ITEMS = 100_000
MAX_BATCH_BYTES = 64 * 1024 * 1024  # payload bytes per enqueue_many call: one ledger transaction
#: Upstash pay-as-you-go price (research note §5, 2026): USD per 100,000 commands
UPSTASH_USD_PER_100K_COMMANDS = 0.20


class Queue(ScheduleMethods):
    """One named queue: Redis dispatch index + SQL ledger."""

    def __init__(self, name: str, settings: Settings, *, backend: Backend | None = None,
                 ledger: Ledger | None = None) -> None:
        self.name = check_name(name, "queue name")
        self.settings = settings
        self.backend = backend or open_backend(settings)
        self.ledger = ledger or Ledger(settings.database_url)
        self.ledger.init_schema()
        self.dispatch = Dispatch(self.backend, self.name, aging_s=settings.priority_aging)
        self.backoff = Backoff(settings.backoff_base, settings.backoff_max)
        # what this process did, for cost per job (stats()["cost"]); bursts may run on threads
        self._tally_lock = threading.Lock()
        self.jobs_enqueued_here = 0  # jobs this process created (deduplicated ones excluded)
        self.jobs_finished_here = 0  # jobs this process's bursts made terminal (completed + failed)

    def __repr__(self) -> str:
        return f"<qkit.Queue {self.name!r} on {self.backend.describe()} + {self.ledger.describe()}>"

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ enqueue
    def enqueue(self, type: str, payload: Mapping[str, Any] | None = None, *, priority: int = 0,
                max_attempts: int = 3, delay: float = 0, key: str | None = None, owner: str | None = None,
                **unknown: Any) -> int:
        """Add one job; returns its id (an existing job's id if ``key`` is already held).

        ``owner`` records who created it (the HTTP API's signed-in user).
        """
        return self.enqueue_result(type, payload, priority=priority, max_attempts=max_attempts, delay=delay,
                                   key=key, owner=owner, **unknown)[0]

    def enqueue_result(self, type: str, payload: Mapping[str, Any] | None = None, **options: Any) -> tuple[int, bool]:
        """Like :meth:`enqueue`, and says whether the job is new: ``(id, False)`` when ``key`` was already
        held by that existing job, which is left as it was."""
        unknown = set(options) - {"priority", "max_attempts", "delay", "key", "owner"}
        if unknown:
            raise BadInput(f"unknown option(s) for enqueue: {', '.join(sorted(unknown))}")
        job = new_job(type, {} if payload is None else payload, **options)
        return self._enqueue_results([job])[0]

    def enqueue_many(self, items: Iterable[Mapping[str, Any]]) -> list[int]:
        """Add a batch, all or nothing: one bad item refuses the whole batch.

        One ledger transaction and one Redis script call per 1,000 jobs.
        """
        if isinstance(items, (str, bytes, Mapping)):
            raise BadInput("enqueue_many takes a list of job objects")
        with gcpause.paused():  # no cyclic collection scans the heap while the batch is built and written
            jobs: list[NewJob] = []
            total = 0
            for i, item in enumerate(items):
                if i == MAX_BATCH_ITEMS:  # refuse before validating the rest of a huge batch
                    raise BadInput(f"a batch holds at most {MAX_BATCH_ITEMS} jobs")
                jobs.append(new_job_from_item(item, i))
                total += len(jobs[-1].payload_text.encode())
                if total > MAX_BATCH_BYTES:
                    raise BadInput(f"a batch holds at most {MAX_BATCH_BYTES} bytes of payload (item {i} passes it)")
            return self._enqueue(jobs) if jobs else []

    def _enqueue(self, jobs: Sequence[NewJob]) -> list[int]:
        return [job_id for job_id, _ in self._enqueue_results(jobs)]

    def _enqueue_results(self, jobs: Sequence[NewJob]) -> list[tuple[int, bool]]:
        """(id, created) per job, in order."""
        if faults.ARMED:
            faults.arm()
        host, t0 = self._host_time()
        # committed without waiting for the disk; synced below, after the push, before the caller hears of it:
        # a worker may start the job while the disk flushes (docs/semantics.md#the-promise)
        results = self.ledger.insert_jobs(self.name, jobs, now=host, synced=False)
        try:
            if faults.ARMED:
                faults.reach("enqueue.after_ledger")
            created = [(job_id, j.priority, int(j.delay * 1000), j.type)
                       for (job_id, new), j in zip(results, jobs) if new]
            with self._tally_lock:
                self.jobs_enqueued_here += len(created)
            if created:
                # the ledger row is committed first: if this push is lost, the next burst pushes it again
                self.dispatch.push(created, mode="new")
                self._correct_times(host, t0, ((job_id, delay_ms) for job_id, _, delay_ms, _ in created),
                                    created=True)
        finally:
            self.ledger.sync()
        return results

    @staticmethod
    def _host_time() -> tuple[datetime | None, float]:
        """(this host's time if no Redis reply has been seen yet, else None; monotonic now).

        Times the ledger records come from Redis's clock once this process has
        seen a script reply (``qkit.ledger.utcnow``); before that, from this host.
        """
        t0 = time.monotonic()
        return (None if redis_now() else utcnow()), t0

    def _correct_times(self, host: datetime | None, t0: float, jobs: Iterable[tuple[int, int]], *,
                       created: bool) -> None:
        """After a process's first script reply: re-write times taken from a host clock that is off.

        ``host`` was this host's clock at monotonic ``t0``; the push reply tells
        what Redis's clock was then.  Only rows still pending and never run are
        corrected (one statement, and only when the host clock is more than
        ``CLOCK_SLACK`` off).  Meanwhile, and if this process dies first, Redis
        still has the job due on its own clock; a burst runs it when Redis says.
        """
        actual = self.dispatch.clock.at(t0)
        if host is None or actual is None or abs(actual - host) <= CLOCK_SLACK:
            return
        self.ledger.correct_times([(job_id, actual + timedelta(milliseconds=delay_ms)) for job_id, delay_ms in jobs],
                                  actual, created)

    # ------------------------------------------------------------------ reads
    def get(self, job_id: int) -> Job:
        """One job of this queue; raises NotFound."""
        return self.ledger.get(_job_id(job_id), self.name)

    def jobs(self, *, status: str | None = None, type: str | None = None, limit: int = 100,
             before_id: int | None = None) -> list[Job]:
        """Jobs of this queue, newest first."""
        return self.ledger.list_jobs(self.name, status=status, type=type, limit=limit, before_id=before_id)

    def stats(self) -> dict[str, Any]:
        """Counts per status (pending = due + delayed), success rate, execution time, cost."""
        counts = self.ledger.status_counts(self.name)
        execution = self.ledger.exec_stats(self.name)
        done = counts["completed"] + counts["failed"]  # cancelled jobs are not in the success rate
        out: dict[str, Any] = {
            "queue": self.name,
            **{k: counts[k] for k in ("pending", "due", "delayed", "processing", "completed", "failed", "cancelled")},
            "total": sum(counts[k] for k in STATUSES),
            "success_rate": round(counts["completed"] / done, 6) if done else None,
            "avg_exec_ms": execution["avg_exec_ms"],
            "attempts": execution["attempts"],
            "backend": self.backend.kind,
        }
        out["cost"] = self.cost()
        from qkit.ops.triage import starvation

        # wait (enqueue -> first claim) per priority and the oldest waiting job: where starvation shows
        out["starvation"] = starvation(self)
        return out

    def cost(self) -> dict[str, Any]:
        """Commands and requests this process sent, per finished job, and the Upstash price of that.

        Everything counts only this process's own work: its enqueues, its
        bursts and its reads (stats, inventory).  ``jobs_finished_here`` are
        the jobs its bursts made terminal, so for a process that both enqueues
        and works, ``commands_per_job`` is the whole lifecycle cost of a job.
        Per-job figures are None until a burst of this process finished a job.
        """
        c = self.backend.counters()
        commands = c["commands"]
        requests = c["requests"] if self.backend.kind == "upstash" else 0
        with self._tally_lock:
            enqueued, finished = self.jobs_enqueued_here, self.jobs_finished_here
        per_job = round(commands / finished, 6) if finished else None
        return {"redis_commands": commands, "http_requests": requests, "ledger_statements": self.ledger.statements,
                "jobs_enqueued_here": enqueued, "jobs_finished_here": finished,
                "commands_per_job": per_job,
                "requests_per_job": round(requests / finished, 6) if finished else None,
                # every command is billed, EVALSHA included (one script call = one command)
                "upstash_usd_per_100k_jobs": (round(per_job * UPSTASH_USD_PER_100K_COMMANDS, 6)
                                              if per_job is not None else None)}

    def dead(self, limit: int | None = None) -> list[Job]:
        """The dead-letter queue: failed jobs with their payload and final error."""
        return self.ledger.dead(self.name, limit)

    # ------------------------------------------------------------------ DLQ
    def replay(self, job_id: int | Sequence[int]) -> list[int]:
        """Put failed jobs back to pending with a fresh attempt budget.

        Refuses (Conflict) if any id is not failed; nothing changes then.
        """
        ids = [job_id] if isinstance(job_id, int) else list(job_id)
        host, t0 = self._host_time()
        replayed = self.ledger.replay(self.name, [_job_id(i) for i in ids], now=host)
        self.dispatch.push([(i, p, 0) for i, p in replayed], mode="repair")
        self._correct_times(host, t0, [(i, 0) for i, _ in replayed], created=False)
        return [i for i, _ in replayed]

    def replay_all(self) -> list[int]:
        """Replay every job in the DLQ."""
        ids = [j.id for j in self.dead()]
        return self.replay(ids) if ids else []

    def replay_fingerprint(self, fingerprint: str, *, type: str | None = None) -> list[int]:
        """Replay every DLQ job whose final error has this fingerprint (full text or short id)."""
        from qkit.ops.triage import replay_fingerprint

        return replay_fingerprint(self, fingerprint, type=type)

    def purge_dead(self, job_ids: Sequence[int | tuple[int, int]] | None = None, *, fingerprint: str | None = None,
                   older_than: Any = None, dry_run: bool = False) -> int:
        """Delete jobs of the DLQ (ledger rows with their history, and Redis entries); returns how many.

        Every failed job of the queue, or only those among ``job_ids`` (ids, or
        (id, epoch) pairs as :func:`qkit.ops.triage.purge_selection` gives), whose
        final error has ``fingerprint`` (its text or short id) and that failed more
        than ``older_than`` ago (seconds, a timedelta, or text like ``"7d"``), each
        when given.  ``dry_run``: only count them; nothing changes.
        """
        if job_ids is None and fingerprint is None and older_than is None:
            failed = [(row[0], row[4]) for row in self.ledger.active_rows(self.name) if row[1] == "failed"]
        else:
            from qkit.ops.retention import dlq_age
            from qkit.ops.triage import purge_selection

            pairs = [j if isinstance(j, tuple) else (_job_id(j), None) for j in (job_ids or [])]
            failed = purge_selection(self, ids=None if job_ids is None else [i for i, _ in pairs],
                                     fingerprint=fingerprint,
                                     older_than=None if older_than is None else dlq_age(older_than))
            seen = {i: epoch for i, epoch in pairs if epoch is not None}
            failed = [(i, epoch) for i, epoch in failed if seen.get(i, epoch) == epoch]
        if dry_run:
            return len(failed)
        return self._purge(failed)

    def _purge(self, failed: list[tuple[int, int]]) -> int:
        # Redis first: if the ledger delete is then lost, the next burst's drift check puts the
        # still-failed jobs back in Redis's DLQ.  The other order could leave DLQ entries that
        # no ledger row explains, which no burst repairs.
        # Each row is deleted only if it is still failed in the epoch read here (a compare-and-set):
        # a job replayed meanwhile stays, and the replay's push puts it back in Redis (DLQ -> ready).
        # A burst's repair that read those rows before the delete may dead-letter them again after
        # the first removal, and a burst that recorded a job failed still holds its lease until its
        # next claim sends the dead-letter: the deleted ids are taken out once more, from every
        # place (a late dead-letter of a lease removed here is fenced; the repair itself re-checks
        # what it dead-lettered, qkit.ops.reconcile.repair), so no entry outlives its row.
        if not failed:
            return 0
        self.dispatch.remove([job_id for job_id, _ in failed], scope="dead")
        deleted = self.ledger.purge_dead(self.name, failed)
        if deleted:
            try:
                self.dispatch.remove(list(deleted), scope="all")
            except BackendUnavailable:  # the rows are gone: report them; the next burst drops what is left
                log.warning("queue %s: purged %d job(s); Redis was unreachable for the last clean-up (the next "
                            "burst drops their DLQ entries)", self.name, len(deleted))
        return len(deleted)

    # ------------------------------------------------------------------ cancel, pause, promote
    def cancel(self, job_id: int) -> bool:
        """Cancel a job (docs/semantics.md#cancel-pause-promote).

        Pending or delayed: ``cancelled`` in the ledger, then out of Redis; a worker that claimed it
        meanwhile finds it cancelled and drops it unrun.  Processing: a cancel request its handler can
        read as ``qkit.current_job().cancel_requested``; the job ends ``cancelled`` when the attempt
        ends.  True in both cases; False if the job already is terminal.  NotFound for an unknown id.
        """
        job_id = _job_id(job_id)
        verdict = self.ledger.cancel(self.name, job_id)
        if verdict == "cancelled":
            self.dispatch.cancel(job_id, "remove")
        elif verdict == "requested":
            self.dispatch.cancel(job_id, "flag")
        return verdict in ("cancelled", "requested")

    def pause(self) -> bool:
        """Stop every burst of this queue from claiming (ledger first, then Redis); True if it was running."""
        changed = self.ledger.set_paused(self.name, True)
        self.dispatch.set_paused(True)
        return changed

    def resume(self) -> bool:
        """Let bursts claim again; True if the queue was paused."""
        changed = self.ledger.set_paused(self.name, False)
        self.dispatch.set_paused(False)
        return changed

    @property
    def paused(self) -> bool:
        """Whether the queue is paused (the ledger's record; a burst restores Redis's flag from it)."""
        return self.ledger.is_paused(self.name)

    def promote(self, job_id: int) -> bool:
        """Run a delayed job now: due at once on Redis's clock.  False if it is not delayed (not pending,
        or already due); NotFound for an unknown id."""
        job_id = _job_id(job_id)
        if not self.ledger.promote(self.name, job_id):
            return False
        self.dispatch.promote(job_id)
        return True

    # ------------------------------------------------------------------ limits per type
    def limit(self, type: str, *, rate: int | None = None, per: float = 60.0,
              concurrency: int | None = None) -> dict[str, Any]:
        """At most ``rate`` attempts of ``type`` start per ``per`` seconds and at most ``concurrency`` run at
        once, across every worker of this queue, on Redis's clock (docs/semantics.md#limits-per-type).
        Replaces the type's previous limit; returns the limit as stored."""
        from qkit.ops.limits import set_limit

        return set_limit(self, type, rate=rate, per=per, concurrency=concurrency)

    def limits(self) -> dict[str, dict[str, Any]]:
        """type -> ``{"rate", "per", "concurrency"}`` of every limit of this queue."""
        from qkit.ops.limits import list_limits

        return list_limits(self)

    def unlimit(self, type: str) -> bool:
        """Lift the limit of ``type``; True if it had one."""
        from qkit.ops.limits import remove_limit

        return remove_limit(self, type)

    # ------------------------------------------------------------------ work
    def _repair(self) -> dict[str, Any]:
        """A burst's first step: put Redis back in line with the ledger, close runs of dead bursts, fire schedules
        (also on a paused queue: a pause stops claims, not enqueues).
        Returns what the drift check found (``paused``: the burst must claim nothing)."""
        from qkit.ops.reconcile import close_abandoned_runs, repair_if_drifted

        found = repair_if_drifted(self)
        close_abandoned_runs(self)
        self.tick()  # the schedules' due fires (Redis's clock as the drift check just read it)
        return found

    def work(self, max_jobs: int | None = None, max_seconds: float | None = None, *,
             concurrency: int = 1, trigger: str = "notebook", progress: Any = None,
             params: dict[str, Any] | None = None, forever: bool = False,
             idle_seconds: float | None = None) -> WorkSummary:
        """Run one burst in this process: claim and run jobs until none is due or a budget is spent.

        ``forever=True`` keeps going when nothing is due: the worker sleeps until an enqueue wakes it (a
        subscription on TCP Redis and the embedded server: no command while idle) or, on Upstash, polls
        every ``idle_seconds`` (default 5); SIGTERM/SIGINT drain it as they drain a burst
        (docs/semantics.md#long-running-workers)."""
        from qkit.engine.worker import Resources, Worker

        if max_jobs is not None and (isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1):
            raise BadInput("max_jobs must be a positive integer")
        if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                        or not max_seconds > 0):
            raise BadInput("max_seconds must be a positive number")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 256:
            raise BadInput("concurrency must be an integer 1..256")
        if idle_seconds is not None and (isinstance(idle_seconds, bool) or not isinstance(idle_seconds, (int, float))
                                         or not 0.05 <= idle_seconds <= 3600):
            raise BadInput("idle_seconds must be a number of seconds, 0.05..3600")
        import_handler_modules(self.settings.handler_modules)
        worker = Worker(Resources(self.name, self.ledger, self.dispatch, self.backoff, self.settings.lease_seconds,
                                  prepare=self._repair, tick=self.tick), max_jobs=max_jobs, max_seconds=max_seconds, concurrency=concurrency,
                        trigger=trigger, progress=progress, params=params, forever=forever,
                        idle_seconds=idle_seconds)
        try:
            return worker.run()
        finally:
            # also when the burst died mid-way: the jobs it finished did cost their commands
            with self._tally_lock:
                self.jobs_finished_here += worker.summary.completed + worker.summary.failed + worker.summary.cancelled

    def close(self) -> None:
        """Release connections (the embedded server keeps running for other processes)."""
        self.backend.close()
        self.ledger.close()


def _job_id(value: Any) -> int:
    return check_job_id(value)


def connect(queue: str = DEFAULT_QUEUE, **overrides: Any) -> Queue:
    """Open a queue with settings from the environment; keyword arguments override them.

    Accepted: ``redis_url, upstash_url, upstash_token, database_url, home,
    backoff_base, backoff_max, lease_seconds, priority_aging``.
    """
    check_overrides(overrides)
    return Queue(queue, resolve_settings(**overrides))

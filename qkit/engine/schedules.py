"""Recurring schedules on the queue facade: ``q.schedule``, ``q.unschedule``, ``q.schedules``, ``q.tick``.

No daemon: every burst (``q.work``, ``qkit work``, ``POST /api/workers``) and
``qkit tick`` calls :meth:`ScheduleMethods.tick` first, which enqueues the fire
times that came due (docs/semantics.md#schedules).  ``now`` is Redis's clock;
which fire times are due is decided by :func:`qkit.engine.cron.due`; each fire
is enqueued exactly once by a compare-and-set on ``next_fire_at`` in the same
transaction as its jobs, whose idempotency keys name (schedule, fire time)
(:meth:`qkit.ledger.schedules.Schedules.fire_schedule`).
"""
from __future__ import annotations

import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any, Mapping

from qkit.engine import faults
from qkit.engine.cron import check_catch_up, check_cron, check_tz, due, job_key, next_after
from qkit.errors import BadInput
from qkit.logs import log
from qkit.model import check_name, new_job

if TYPE_CHECKING:
    from qkit.engine.dispatch import Dispatch
    from qkit.ledger import Ledger

#: the fields of a schedule as ``q.schedules()`` returns them
FIELDS = ("name", "cron", "tz", "type", "payload", "priority", "max_attempts", "catch_up", "next_fire_at",
          "last_fire_at", "last_job_id", "created_at", "updated_at")


class ScheduleMethods:
    """The schedule part of :class:`qkit.engine.queue.Queue` (it provides the attributes below)."""

    name: str
    ledger: "Ledger"
    dispatch: "Dispatch"
    _tally_lock: threading.Lock
    jobs_enqueued_here: int

    def schedule(self, name: str, cron: str, type: str, payload: Mapping[str, Any] | None = None, *,
                 priority: int = 0, max_attempts: int = 3, tz: str = "UTC", catch_up: str = "latest",
                 now: datetime | None = None) -> dict[str, Any]:
        """Create or replace the recurring job ``name``: one job of ``type`` per fire time of ``cron`` in ``tz``.

        ``catch_up`` says what a tick does with fire times that passed while
        nothing ticked: ``"latest"`` (one job, for the latest), ``"all"`` (one
        each, at most :data:`qkit.engine.cron.MAX_CATCH_UP`) or ``"skip"`` (none).
        Replacing a schedule with the same ``cron`` and ``tz`` keeps its next
        fire time; otherwise the first fire is the first fire time after now.
        ``now`` is for tests and simulations only (default: Redis's clock).
        Returns the stored schedule.
        """
        check_name(name, "schedule name")
        cron = check_cron(cron)
        check_tz(tz)
        check_catch_up(catch_up)
        job = new_job(type, {} if payload is None else payload, priority=priority, max_attempts=max_attempts)
        now = now or self.redis_time()
        existing = self.ledger.get_schedule(self.name, name)
        if existing is not None and existing["cron"] == cron and existing["tz"] == tz:
            next_fire = existing["next_fire_at"]
        else:
            next_fire = next_after(cron, tz, now)  # BadInput if the expression never fires (e.g. 30 February)
        self.ledger.save_schedule(self.name, dict(name=name, cron=cron, tz=tz, type=job.type, payload=job.payload,
                                                  priority=job.priority, max_attempts=job.max_attempts,
                                                  catch_up=catch_up, next_fire_at=next_fire))
        saved = self.ledger.get_schedule(self.name, name)
        assert saved is not None
        return _public(saved)

    def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name``; False if there was none.  Jobs it already enqueued stay."""
        return self.ledger.delete_schedule(self.name, check_name(name, "schedule name"))

    def schedules(self) -> list[dict[str, Any]]:
        """This queue's schedules, soonest next fire first."""
        return [_public(row) for row in self.ledger.list_schedules(self.name)]

    def tick(self, *, now: datetime | None = None) -> list[dict[str, Any]]:
        """Enqueue the jobs of every schedule whose fire time came; one SQL query when none did.

        Returns one entry per schedule this call moved on: ``name``, ``fires``
        (the fire times enqueued), ``job_ids``, ``skipped`` (due fire times not
        enqueued under its ``catch_up``; None when more than
        :data:`qkit.engine.cron.SCAN_LIMIT` passed) and ``next_fire_at``.  A
        schedule another process moved on first is left to it (not listed).
        ``now`` is for tests and simulations only (default: Redis's clock).
        """
        if faults.ARMED:
            faults.arm()
        now = now or self.redis_time()
        fired = []
        for row in self.ledger.due_schedules(self.name, now):
            try:
                plan = due(row["cron"], row["tz"], row["next_fire_at"], now, row["catch_up"])
                jobs = [new_job(row["type"], row["payload"] or {}, priority=row["priority"],
                                max_attempts=row["max_attempts"], key=job_key(row["name"], fire))
                        for fire in plan.fires]
            except BadInput as exc:  # a definition this version cannot read: the other schedules still fire
                log.error("queue %s: schedule %s cannot fire: %s", self.name, row["name"], exc)
                continue
            results = self.ledger.fire_schedule(
                self.name, row["name"], expect_next=row["next_fire_at"], expect_updated=row["updated_at"],
                next_fire_at=plan.next_fire_at, last_fire_at=plan.fires[-1] if plan.fires else None, jobs=jobs)
            if results is None:
                continue  # another burst or tick fired it first
            if faults.ARMED:
                faults.reach("tick.after_ledger")
            created = [(job_id, row["priority"], 0, row["type"]) for job_id, new in results if new]
            with self._tally_lock:
                self.jobs_enqueued_here += len(created)
            if created:
                # committed first: if this push is lost, the next burst's drift check pushes the rows
                self.dispatch.push(created, mode="new")
            fired.append({"name": row["name"], "fires": list(plan.fires), "job_ids": [i for i, _ in results],
                          "skipped": plan.skipped, "next_fire_at": plan.next_fire_at})
            if plan.fires or plan.skipped:
                log.info("queue %s: schedule %s enqueued %d job(s), skipped %s fire time(s); next %s", self.name,
                         row["name"], len(plan.fires), "many" if plan.skipped is None else plan.skipped,
                         f"{plan.next_fire_at:%Y-%m-%d %H:%M:%S} UTC")
        return fired

    def redis_time(self) -> datetime:
        """Redis's clock now: carried on from the queue's last script reply, or asked (one command)."""
        now = self.dispatch.clock.now()
        if now is None:
            self.dispatch.inventory()
            now = self.dispatch.clock.now()
        assert now is not None
        return now


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in FIELDS}

"""The hot path's SQL: enqueue, claim and settle, as a few batched statements sent straight to the driver.

The ledger records here what :mod:`qkit.engine.lifecycle` decides; the returned
plans carry the :class:`~qkit.engine.lifecycle.Settlement` each job needs in Redis,
which :mod:`qkit.engine.dispatch` carries out.  See docs/architecture.md#the-ledger
for the order of the writes and the crash windows.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.engine import Connection

from qkit.engine import storable
from qkit.engine.backoff import Backoff
from qkit.ledger.driver_sql import (CLAIM_JOBS, INSERT_ATTEMPT, INSERT_EVENT, INSERT_JOB,  # noqa: F401 (re-exported)
                                    SELECT_CLAIM, SELECT_FENCE, SELECT_OPEN, SETTLE_ATTEMPT, SETTLE_JOB, ClaimRow,
                                    DriverSQL, OpenAttempt)
from qkit.ledger.engine import LedgerBase, dumps, transient, utcnow
from qkit.ledger.interventions import cancel_requests, clear_cancel_requests
from qkit.ledger.schema import job_attempts, jobs
from qkit.engine.lifecycle import (ClaimPlan, Outcome, Runnable, Settlement, SettlePlan, decide, fingerprint, lost_error,
                            resend, unstorable)
from qkit.logs import log
from qkit.model import NewJob

#: a retry claimed this much before its run_at still runs: Redis decides due times on its own clock,
#: and run_at is written from an estimate of it (qkit.engine.dispatch.RedisClock)
NOT_DUE_SLACK = timedelta(seconds=1)


class HotPath(LedgerBase):
    """Enqueue, claim and settle: the statements every job passes through."""

    # ------------------------------------------------------------------ enqueue
    def insert_jobs(self, queue: str, new: Sequence[NewJob], now: datetime | None = None, *,
                    synced: bool = True) -> list[tuple[int, bool]]:
        """Insert jobs as ``pending``; returns (id, created) per item, in order.

        An idempotency key held by any job of the queue, failed ones included,
        returns that job's id (created False); the database's unique index
        decides, so concurrent callers agree.  With ``synced=False`` a SQLite
        commit does not wait for the disk: the caller calls :meth:`sync` before
        it acknowledges anything.
        """
        with self._write(durable=synced) as conn:
            return self._insert_jobs(conn, queue, new, now or utcnow())

    def _insert_jobs(self, conn: Connection, queue: str, new: Sequence[NewJob],
                     now: datetime) -> list[tuple[int, bool]]:
        """:meth:`insert_jobs` inside the caller's transaction (a schedule's fire commits with its jobs)."""
        results: list[tuple[int, bool] | None] = [None] * len(new)

        def row(j: NewJob) -> dict[str, Any]:
            return dict(queue=queue, type=j.type, payload=j.payload, status="pending", priority=j.priority,
                        attempts=0, max_attempts=j.max_attempts, idempotency_key=j.key, owner=j.owner,
                        run_at=now + timedelta(seconds=j.delay), created_at=now, updated_at=now, epoch=0)

        plain = [i for i, j in enumerate(new) if j.key is None]
        if plain:
            ids = self._reserve_ids(conn, len(plain))
            d = self.driver
            at = d.ts(now)  # one text for the batch's times; a delayed job's run_at is its own
            self.driver.run(conn, INSERT_JOB, [
                (job_id, queue, j.type, j.payload_text, j.priority, j.max_attempts,
                 at if not j.delay else d.ts(now + timedelta(seconds=j.delay)), at, at, j.owner)
                for j, job_id in zip((new[i] for i in plain), ids)])
            self.statements += 2
            for i, job_id in zip(plain, ids):
                results[i] = (job_id, True)
        for i, j in enumerate(new):
            if j.key is not None:
                results[i] = self._insert_keyed(conn, queue, row(j), j.key)
        at = self.driver.ts(now)
        self.driver.run(conn, INSERT_EVENT, [
            (r[0], at, "enqueued", None, None) if r[1] else
            (r[0], at, "deduplicated", None, dumps({"key": new[i].key}))
            for i, r in enumerate(results) if r is not None])
        self.statements += 1
        return [r for r in results if r is not None]

    def _insert_keyed(self, conn: Connection, queue: str, values: dict[str, Any], key: str) -> tuple[int, bool]:
        """Insert one job with an idempotency key, or return the id of the job holding the key.

        A job keeps its key until it is purged.  On PostgreSQL a purge can delete
        the holder between the conflicting insert and the fetch, each statement
        seeing the latest commits: then nothing holds the key any more and the
        insert is tried again.  Every round either inserts, or finds a holder,
        or saw a holder purged since the previous round, so the loop ends.
        """
        stmt = (self._insert(jobs).values(**values)
                .on_conflict_do_nothing(index_elements=["queue", "idempotency_key"]).returning(jobs.c.id))
        holder = select(jobs.c.id).where(jobs.c.queue == queue, jobs.c.idempotency_key == key)
        while True:
            job_id = conn.execute(stmt).scalar()
            self.statements += 1
            if job_id is not None:
                return int(job_id), True
            existing = conn.execute(holder).scalar()
            self.statements += 1
            if existing is not None:
                return int(existing), False

    def _reserve_ids(self, conn: Connection, n: int) -> list[int]:
        """Ids for ``n`` new jobs, in order: they are the FIFO sequence within a priority.

        Never an id any job had before (docs/semantics.md#the-promise): PostgreSQL's sequence only
        moves forward; on SQLite ``jobs`` is AUTOINCREMENT (schema v3), whose
        ``sqlite_sequence`` row remembers the highest id ever inserted, also
        after those rows were purged, and moves up with the explicit ids inserted here.
        """
        if self.dialect == "postgresql":
            rows = conn.exec_driver_sql(
                "SELECT nextval(pg_get_serial_sequence('jobs', 'id')) FROM generate_series(1, %s)", (n,))
            return sorted(int(r[0]) for r in rows)
        # SQLite: this transaction holds the write lock (BEGIN IMMEDIATE), so neither can move
        top = conn.exec_driver_sql(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM jobs), 0),"
            " COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0))").scalar()
        return list(range(int(top) + 1, int(top) + n + 1))


    def correct_times(self, due: Sequence[tuple[int, datetime]], at: datetime, created: bool) -> None:
        """Re-write run_at (and updated_at, and created_at if ``created``) of jobs still pending and never
        run, written from a host clock found off Redis's (see ``Queue._correct_times``)."""
        if not due:
            return
        values: dict[str, Any] = dict(run_at=bindparam("b_run_at"), updated_at=at)
        if created:
            values["created_at"] = at
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id"), jobs.c.status == "pending",
                                            jobs.c.attempts == 0).values(**values),
                         [dict(b_id=job_id, b_run_at=run_at) for job_id, run_at in due])
            self.statements += 1

    # ------------------------------------------------------------------ claim
    def claim(self, queue: str, worker: str, job_ids: Sequence[int], reclaimed: dict[int, str],
              backoff: Backoff, now: datetime | None = None, again: bool = False) -> ClaimPlan:
        """Record the claim of ids Redis just leased to ``worker``.

        Rows that are missing or already terminal are dropped (settlement
        'done', never run).  A row still ``processing`` had an attempt that
        never finished: it is closed as ``lost`` and the job is retried or
        dead-lettered like any failure.  The rest get an open attempt row.
        With ``again`` (a retry of a call whose commit went unanswered), an
        attempt this worker already opened is taken as it is, not as lost.
        """
        now = now or utcnow()
        plan = ClaimPlan()
        ids = list(dict.fromkeys(list(reclaimed) + list(job_ids)))
        if not ids:
            return plan
        with self._write() as conn:
            d = self.driver
            # the rows as the driver returns them (SELECT_CLAIM's columns, in ClaimRow's order, then the queue);
            # another queue's id written into this queue's keys is no job of this queue: dropped, never run
            rows = {r[0]: r for r in d.select_ids(conn, SELECT_CLAIM, ids, lock=True) if r[9] == queue}
            open_attempts = {}
            cancels: set[int] = set()
            in_flight = [i for i in ids if i in rows and rows[i][1] == "processing"]
            if in_flight:
                open_attempts = {r[0]: OpenAttempt(r[0], r[1], r[2], d.ts_in(r[3]), r[4])
                                 for r in d.select_ids(conn, SELECT_OPEN, in_flight)}
                cancels = cancel_requests(conn) & set(in_flight)  # a lost attempt of a job being cancelled
                self.statements += 1
            self.statements += 2
            at = d.ts(now)
            # rows in the driver's form, built directly: this loop runs once per job
            claim_ids: list[int] = []
            attempt_rows: list[tuple] = []
            event_rows: list[tuple] = []
            lost_rows: list[dict[str, Any]] = []
            job_updates: list[dict[str, Any]] = []
            runnable, settlements = plan.runnable, plan.settlements
            for job_id in ids:
                raw = rows.get(job_id)
                if raw is None or raw[1] not in ("pending", "processing"):
                    # finished already (its settle never reached Redis): drop it, or put it back in the DLQ
                    settlements.append(resend(job_id, raw and raw[1], raw[4] if raw else 0))
                    continue
                _, status, type_, payload, priority, attempts, max_attempts, epoch, run_at, _ = raw
                payload = d.payload_in(payload)
                if attempts or status == "processing":  # not the first attempt of a pending job: the rare cases
                    r = ClaimRow(job_id, status, type_, payload, priority, attempts, max_attempts, epoch,
                                 d.ts_in(run_at))
                    if r.status == "pending" and r.run_at > now + NOT_DUE_SLACK:
                        # a retry whose Redis settle never arrived (its lease expired instead): not due
                        # before run_at (docs/semantics.md#order), so it goes back to wait, without an attempt
                        wait_ms = int((r.run_at - now).total_seconds() * 1000)
                        settlements.append(Settlement(job_id, "retry", wait_ms, r.priority))
                        continue
                    previous = open_attempts.get(job_id)
                    if again and r.status == "processing" and previous is not None and previous.worker == worker:
                        runnable.append(Runnable(job_id, r.type, r.payload, r.priority, previous.attempt,
                                                 r.max_attempts, r.epoch, previous.started_at))
                        continue
                    if r.status == "processing":
                        # the previous holder's lease expired: that attempt was lost
                        plan.lost += 1
                        holder = previous.worker if previous else (reclaimed.get(job_id) or "unknown")
                        error = lost_error(holder)
                        if previous is not None:
                            duration = (now - previous.started_at).total_seconds() * 1000
                            lost_rows.append(dict(b_job=job_id, b_epoch=previous.epoch, b_attempt=previous.attempt,
                                                  finished_at=now, duration_ms=duration, error=error,
                                                  fingerprint=fingerprint(error)))
                        event_rows.append(_event(job_id, at, "reclaimed", worker,
                                                 {"from_worker": holder, "lost_attempt": attempts}))
                        verdict = decide("lost", job_id=job_id, epoch=r.epoch, attempt=attempts,
                                         max_attempts=r.max_attempts, backoff=backoff, cancelled=job_id in cancels)
                        if verdict.status == "cancelled":
                            job_updates.append(dict(b_id=job_id, status="cancelled", run_at=now, error=error,
                                                    finished_at=now, attempts=attempts))
                            event_rows.append(_event(job_id, at, "cancelled", worker,
                                                     {"attempt": attempts, "outcome": "lost"}))
                            settlements.append(verdict.settlement(job_id, r.priority))
                            plan.cancelled += 1
                            continue
                        if verdict.dead:
                            job_updates.append(dict(b_id=job_id, status="failed", run_at=now, error=error,
                                                    finished_at=now, attempts=attempts))
                            event_rows += [_event(job_id, at, "failed", worker, {"attempt": attempts, "outcome": "lost"}),
                                           _event(job_id, at, "dead", worker, None)]
                            settlements.append(verdict.settlement(job_id, r.priority))
                            plan.failed += 1
                            continue
                        if verdict.delay > 0:
                            job_updates.append(dict(b_id=job_id, status="pending",
                                                    run_at=now + timedelta(seconds=verdict.delay),
                                                    error=error, finished_at=None, attempts=attempts))
                            event_rows.append(_event(job_id, at, "retry_scheduled", worker,
                                                     {"attempt": attempts, "delay_s": round(verdict.delay, 3)}))
                            settlements.append(verdict.settlement(job_id, r.priority))
                            plan.retried += 1
                            continue
                        # a retry due at once: this worker holds the lease, so it runs the next attempt now
                attempt = attempts + 1
                claim_ids.append(job_id)
                attempt_rows.append((job_id, epoch, attempt, worker, at))
                event_rows.append((job_id, at, "claimed", worker, f'{{"attempt":{attempt}}}'))
                runnable.append(Runnable(job_id, type_, payload, priority, attempt, max_attempts, epoch, now))
            if lost_rows:
                conn.execute(update(job_attempts).where(
                    job_attempts.c.job_id == bindparam("b_job"), job_attempts.c.epoch == bindparam("b_epoch"),
                    job_attempts.c.attempt == bindparam("b_attempt"), job_attempts.c.outcome.is_(None))
                    .values(outcome="lost", finished_at=bindparam("finished_at"),
                            duration_ms=bindparam("duration_ms"), error=bindparam("error"),
                            fingerprint=bindparam("fingerprint")), lost_rows)
                self.statements += 1
            if cancels:
                clear_cancel_requests(conn, cancels)
                self.statements += 1
            if job_updates:
                conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id")).values(
                    status=bindparam("status"), run_at=bindparam("run_at"), error=bindparam("error"),
                    finished_at=bindparam("finished_at"), attempts=bindparam("attempts"), updated_at=now),
                    job_updates)
                self.statements += 1
            if claim_ids:
                # one statement for the whole batch: every claimed row gets its next attempt
                conn.exec_driver_sql(d.with_ids(CLAIM_JOBS), (at, at, d.ids_arg(claim_ids)))
                d.run(conn, INSERT_ATTEMPT, attempt_rows)
                self.statements += 2
            self._insert_events(conn, event_rows)
        return plan

    # ------------------------------------------------------------------ settle
    def settle(self, worker: str, outcomes: Sequence[Outcome], backoff: Backoff,
               now: datetime | None = None, again: bool = False) -> SettlePlan:
        """Record how attempts ended, fenced: only the attempt the ledger holds as current counts.

        Outcome text the ledger cannot store is escaped or cut and flagged
        (:mod:`qkit.engine.storable`).  If the batch's transaction still fails for a
        reason other than the ledger being unreachable, the outcomes are written
        one by one, so only a job whose own outcome is refused fails, recorded
        as ``OutcomeNotStored``.  ``again``: an earlier call with these outcomes
        may have committed without an answer (see :meth:`_settle`).
        """
        now = now or utcnow()
        try:
            return self._settle(worker, outcomes, backoff, now, again)
        except Exception as exc:  # noqa: BLE001 - sorted below: unreachable ledgers are the caller's to retry
            if transient(exc):
                raise
            first = exc
        log.warning("could not record a batch of %d outcomes (%s): recording them one by one",
                    len(outcomes), type(first).__name__)
        plan = SettlePlan()
        for o in outcomes:
            try:
                part = self._settle(worker, [o], backoff, now, again)
            except Exception as exc:  # noqa: BLE001
                if transient(exc):
                    raise
                log.warning("job %s: its outcome could not be stored (%s); recorded as failed",
                            o.job.id, type(exc).__name__)
                part = self._settle(worker, [unstorable(o, exc)], backoff, now, again)
            plan.merge(part)
        return plan

    def _settle(self, worker: str, outcomes: Sequence[Outcome], backoff: Backoff, now: datetime,
                again: bool) -> SettlePlan:
        """One transaction for ``outcomes``.

        With ``again``, a job whose row no longer is at this attempt's
        ``processing`` but still at this attempt and epoch was settled by an
        earlier call whose commit went unanswered (or marked lost by a
        reclaimer): Redis is told what the ledger holds instead of fencing it.
        """
        plan = SettlePlan()
        if not outcomes:
            return plan
        pg = self.driver.pg
        with self._write() as conn:
            d = self.driver
            # (id, status, attempts, epoch) as the driver returns them (SELECT_FENCE's columns)
            current = {r[0]: r for r in d.select_ids(conn, SELECT_FENCE, [o.job.id for o in outcomes], lock=True)}
            # read after the rows are locked: a cancel committed before this point ends its job cancelled
            cancels = cancel_requests(conn)
            self.statements += 2
            ended_cancelled: list[int] = []
            at = d.ts(now)
            # rows in the driver's form, built directly: this loop runs once per job
            job_rows: list[tuple] = []
            attempt_rows: list[tuple] = []
            event_rows: list[tuple] = []
            released: list[dict[str, Any]] = []
            settlements = plan.settlements
            for o in outcomes:
                j = o.job
                job_id, attempt, epoch = j.id, j.attempt, j.epoch
                r = current.get(job_id)
                if r is None or r[1] != "processing" or r[2] != attempt or r[3] != epoch:
                    if again and r is not None and r[2] == attempt and r[3] == epoch:
                        settlements.append(resend(job_id, r[1], j.priority))
                        continue
                    plan.fenced.append(job_id)
                    continue
                cancelled = job_id in cancels
                if o.outcome == "released":
                    verdict = decide("released", job_id=job_id, epoch=epoch, attempt=attempt,
                                     max_attempts=j.max_attempts, backoff=backoff, cancelled=cancelled)
                    released.append(dict(b_id=job_id, b_epoch=epoch, b_attempt=attempt, b_status=verdict.status,
                                         b_finished=now if cancelled else None))
                    event_rows.append(_event(job_id, at, "released", worker, {"attempt": attempt}))
                    if cancelled:
                        event_rows.append(_event(job_id, at, "cancelled", worker,
                                                 {"attempt": attempt, "outcome": "released"}))
                        ended_cancelled.append(job_id)
                        plan.cancelled += 1
                    else:
                        plan.released += 1
                    settlements.append(verdict.settlement(job_id, j.priority))
                    continue
                duration = (o.finished_at - j.started_at).total_seconds() * 1000
                finished = d.ts(o.finished_at)
                result, escaped = None, False
                if o.outcome == "completed" and o.result is not None:
                    try:
                        result, escaped = storable.result_json(o.result, pg)
                    except ValueError as exc:
                        o = unstorable(o, exc)
                if o.error is None and o.traceback is None:  # a completed attempt: no text to check
                    error = tb = key = None
                else:
                    error, tb = storable.text(o.error, pg), storable.text(o.traceback, pg)
                    key = fingerprint(error, o.traceback)
                asked_ms = None if o.retry_after is None else o.retry_after * 1000  # the delay the handler named
                attempt_rows.append((o.outcome, finished, duration, error, tb, key, asked_ms,
                                     job_id, epoch, attempt))
                verdict = decide(o.outcome, job_id=job_id, epoch=epoch, attempt=attempt, max_attempts=j.max_attempts,
                                 backoff=backoff, permanent=o.permanent, retry_after=o.retry_after,
                                 cancelled=cancelled)
                settlements.append(verdict.settlement(job_id, j.priority))
                if verdict.status == "cancelled":
                    # the attempt keeps what happened; the job ends cancelled (its result or error kept)
                    job_rows.append(("cancelled", result, error, finished, None, at, job_id))
                    event_rows.append(_event(job_id, at, "cancelled", worker,
                                             {"attempt": attempt, "outcome": o.outcome}))
                    ended_cancelled.append(job_id)
                    plan.cancelled += 1
                elif verdict.status == "completed":
                    job_rows.append(("completed", result, None, finished, None, at, job_id))
                    flag = ',"escaped":"result"' if escaped else ""
                    event_rows.append((job_id, at, "completed", worker,
                                       f'{{"attempt":{attempt},"duration_ms":{duration:.3f}{flag}}}'))
                    plan.completed += 1
                elif verdict.dead:
                    job_rows.append(("failed", None, error, finished, None, at, job_id))
                    event_rows += [_event(job_id, at, "failed", worker,
                                          {"attempt": attempt, "outcome": o.outcome, "reason": verdict.reason}),
                                   _event(job_id, at, "dead", worker, None)]
                    plan.failed += 1
                else:
                    delay = verdict.delay
                    job_rows.append(("pending", None, error, None, d.ts(now + timedelta(seconds=delay)), at, job_id))
                    detail = {"attempt": attempt, "outcome": o.outcome, "delay_s": round(delay, 3)}
                    if asked_ms is not None:
                        detail["retry_after_s"] = round(asked_ms / 1000, 3)
                    event_rows.append(_event(job_id, at, "retry_scheduled", worker, detail))
                    plan.retried += 1
            d.run(conn, SETTLE_JOB, job_rows)
            d.run(conn, SETTLE_ATTEMPT, attempt_rows)
            self.statements += 2
            if released:
                conn.execute(delete(job_attempts).where(
                    job_attempts.c.job_id == bindparam("b_id"), job_attempts.c.epoch == bindparam("b_epoch"),
                    job_attempts.c.attempt == bindparam("b_attempt")), released)
                conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id")).values(
                    status=bindparam("b_status"), attempts=jobs.c.attempts - 1, finished_at=bindparam("b_finished"),
                    updated_at=now), released)
                self.statements += 2
            if ended_cancelled:
                clear_cancel_requests(conn, ended_cancelled)
                self.statements += 1
            self._insert_events(conn, event_rows)
        return plan

    def _insert_events(self, conn: Connection, rows: Sequence[tuple]) -> None:
        """Insert event rows in the driver's form (:func:`_event`)."""
        if rows:
            self.driver.run(conn, INSERT_EVENT, rows)
            self.statements += 1


def _event(job_id: int, at: Any, event: str, worker: str | None, detail: dict[str, Any] | None) -> tuple:
    """One ``job_events`` row in the driver's form: ``at`` as :meth:`DriverSQL.ts` gives it, the detail as JSON."""
    return (job_id, at, event, worker, None if detail is None else dumps(detail))

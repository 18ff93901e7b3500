"""The ledger's admin writes: DLQ replay and purge, and prune, as compare-and-sets against concurrent workers."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import and_, bindparam, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from qkit.errors import Conflict, NotFound
from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import job_attempts, job_daily, job_events, jobs


class Admin(LedgerBase):
    """Replay and purge of dead jobs (docs/semantics.md)."""

    def replay(self, queue: str, job_ids: Sequence[int], now: datetime | None = None) -> list[tuple[int, int]]:
        """Failed -> pending with a fresh attempt budget; returns (id, priority) of each.

        Refuses the whole call (nothing changed) if any id is missing or not failed.
        A compare-and-set on (status, epoch): the rows are locked as read
        (PostgreSQL; SQLite's writer holds the whole database), and the update
        must change every one of them, so a concurrent purge, replay or burst
        either waits for this replay or makes it refuse; never both succeed.
        """
        now = now or utcnow()
        ids = list(dict.fromkeys(int(i) for i in job_ids))
        if not ids:
            return []
        try:
            with self._write(durable=True) as conn:
                query = select(jobs.c.id, jobs.c.status, jobs.c.priority, jobs.c.epoch).where(
                    jobs.c.id.in_(ids), jobs.c.queue == queue)
                if self.dialect == "postgresql":
                    query = query.order_by(jobs.c.id).with_for_update()
                rows = {r.id: r for r in conn.execute(query)}
                for job_id in ids:
                    if job_id not in rows:
                        raise NotFound(f"no job {job_id} in queue {queue!r}")
                    if rows[job_id].status != "failed":
                        raise Conflict(f"job {job_id} is {rows[job_id].status}, not failed: only failed jobs can be replayed")
                changed = conn.execute(update(jobs).where(
                    jobs.c.id == bindparam("b_id"), jobs.c.status == "failed", jobs.c.epoch == bindparam("b_epoch"))
                    .values(status="pending", attempts=0, epoch=jobs.c.epoch + 1, run_at=now, result=None,
                            finished_at=None, updated_at=now),
                    [dict(b_id=i, b_epoch=rows[i].epoch) for i in ids]).rowcount
                if changed != len(ids):  # cannot happen under the locks above; refuse rather than half-replay
                    raise Conflict("a job changed while it was being replayed: nothing was replayed; try again")
                conn.execute(insert(job_events), [dict(job_id=i, at=now, event="replayed", worker=None, detail=None)
                                                  for i in ids])
                self.statements += 3
        except IntegrityError:
            raise Conflict("a replayed job's idempotency key is now held by a newer job") from None
        return [(i, rows[i].priority) for i in ids]

    def purge_dead(self, queue: str, job_ids: Sequence[int | tuple[int, int]] | None = None) -> list[int]:
        """Delete failed jobs (all of the queue's, or the given ids) with their attempts and events.

        ``job_ids`` may pair each id with the replay epoch it was seen failed in:
        a job replayed since (and perhaps failed again) is then left alone.  The
        rows are chosen under lock and the delete re-checks the status (a
        compare-and-set), so a job replayed meanwhile survives, history included;
        only the rows the delete really removed lose their attempts and events.
        Returns those ids.
        """
        with self._write(durable=True) as conn:
            query = select(jobs.c.id, jobs.c.epoch).where(jobs.c.queue == queue, jobs.c.status == "failed")
            if job_ids is None:
                wanted = None
            else:
                wanted = dict(j if isinstance(j, tuple) else (j, None) for j in job_ids)
                query = query.where(jobs.c.id.in_(list(wanted)))
            if self.dialect == "postgresql":
                # lock what is chosen, in id order (as replay does): a replay either committed before
                # (the row is then seen pending and skipped) or waits for this purge to end
                query = query.order_by(jobs.c.id).with_for_update()
            ids = [i for i, epoch in conn.execute(query).all()
                   if wanted is None or wanted[i] is None or wanted[i] == epoch]
            deleted: list[int] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                gone = list(conn.execute(delete(jobs).where(
                    jobs.c.id.in_(chunk), jobs.c.queue == queue, jobs.c.status == "failed")
                    .returning(jobs.c.id)).scalars())
                if gone:
                    conn.execute(delete(job_events).where(job_events.c.job_id.in_(gone)))
                    conn.execute(delete(job_attempts).where(job_attempts.c.job_id.in_(gone)))
                deleted += gone
                self.statements += 3
        return sorted(deleted)

    def dead_candidates(self, queue: str, *, before: datetime | None = None,
                        ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """The queue's failed jobs a filtered purge chooses from, oldest failure first: ``id``, ``epoch``,
        ``type``, ``finished_at``, ``error`` (its first 1,000 characters) and the stored ``fingerprint`` of
        the final attempt; only those that failed before ``before`` and are among ``ids``, when given."""
        j, a = jobs, job_attempts
        query = (select(j.c.id, j.c.epoch, j.c.type, j.c.finished_at, func.substr(j.c.error, 1, 1000).label("error"),
                        a.c.fingerprint)
                 .select_from(j.outerjoin(a, and_(a.c.job_id == j.c.id, a.c.epoch == j.c.epoch,
                                                  a.c.attempt == j.c.attempts)))
                 .where(j.c.queue == queue, j.c.status == "failed").order_by(j.c.finished_at, j.c.id))
        if before is not None:
            query = query.where(j.c.finished_at < before)
        wanted = None if ids is None else sorted({int(i) for i in ids})
        with self.read_engine.connect() as conn:
            if wanted is None:
                return [dict(r) for r in conn.execute(query).mappings()]
            return [dict(r) for start in range(0, len(wanted), 500)
                    for r in conn.execute(query.where(j.c.id.in_(wanted[start:start + 500]))).mappings()]

    def add_events(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            with self._write() as conn:
                conn.execute(insert(job_events), list(rows))



# ---------------------------------------------------------------- prune (qkit/ops/retention.py decides the roll-ups)
def _completed_rows(conn: Any, ids: list[int]) -> tuple[list[Any], list[Any]]:
    """(id, queue, type, created_at, started_at, finished_at) of jobs ``ids``, and (job_id, outcome,
    duration_ms) of all their attempts."""
    job_rows = conn.execute(select(jobs.c.id, jobs.c.queue, jobs.c.type, jobs.c.created_at, jobs.c.started_at,
                                   jobs.c.finished_at).where(jobs.c.id.in_(ids))).all()
    attempt_rows = conn.execute(select(job_attempts.c.job_id, job_attempts.c.outcome, job_attempts.c.duration_ms)
                                .where(job_attempts.c.job_id.in_(ids))).all()
    return job_rows, attempt_rows


def prunable_counts(ledger: LedgerBase, queue: str, cutoff: datetime) -> tuple[int, int, int, list[datetime]]:
    """What a prune would delete: (jobs, attempts, events, finished_at of each job)."""
    prunable = (jobs.c.queue == queue) & (jobs.c.status == "completed") & (jobs.c.finished_at < cutoff)
    with ledger.read_engine.connect() as conn:
        n_jobs = int(conn.execute(select(func.count()).select_from(jobs).where(prunable)).scalar())
        ids = select(jobs.c.id).where(prunable)
        n_attempts = int(conn.execute(select(func.count()).select_from(job_attempts)
                                      .where(job_attempts.c.job_id.in_(ids))).scalar())
        n_events = int(conn.execute(select(func.count()).select_from(job_events)
                                    .where(job_events.c.job_id.in_(ids))).scalar())
        finished = [r[0] for r in conn.execute(select(jobs.c.finished_at).where(prunable))]
    return n_jobs, n_attempts, n_events, finished


def prune_batch(ledger: LedgerBase, queue: str, cutoff: datetime, batch_size: int,
                rollup: Callable[[list[Any], list[Any]], dict[tuple[str, str, str], Any]],
                merge: Callable[[Any, dict[str, Any] | None], dict[str, Any]]) -> tuple[dict, int, int, int] | None:
    """Delete one batch of completed jobs that finished before ``cutoff``, adding them to ``job_daily``.

    One transaction: ``rollup(job_rows, attempt_rows)`` gives (day, queue, type) -> roll-up, and
    ``merge(rollup, old_row or None)`` the ``job_daily`` values to write.  Returns (the roll-ups,
    events, attempts and jobs deleted), or None when nothing is left to prune.
    """
    prunable = (jobs.c.queue == queue) & (jobs.c.status == "completed") & (jobs.c.finished_at < cutoff)
    pg = ledger.dialect == "postgresql"
    with ledger.engine.begin() as conn:
        if pg:
            # one prune at a time adds to job_daily (read-modify-write of the roll-up rows);
            # SQLite writers are already serialised by BEGIN IMMEDIATE
            conn.execute(text("LOCK TABLE job_daily IN SHARE ROW EXCLUSIVE MODE"))
        query = select(jobs.c.id).where(prunable).order_by(jobs.c.id).limit(batch_size)
        if pg:
            query = query.with_for_update(skip_locked=True)
        ids = [int(i) for i in conn.execute(query).scalars()]
        if not ids:
            return None
        rolled = rollup(*_completed_rows(conn, ids))
        for (day, q_name, type_), d in rolled.items():
            where = (job_daily.c.day == day) & (job_daily.c.queue == q_name) & (job_daily.c.type == type_)
            old = conn.execute(select(job_daily).where(where)).mappings().first()
            values = merge(d, old)
            if old is None:
                conn.execute(insert(job_daily).values(day=day, queue=q_name, type=type_, **values))
            else:
                conn.execute(update(job_daily).where(where).values(**values))
        events = conn.execute(delete(job_events).where(job_events.c.job_id.in_(ids))).rowcount or 0
        attempts = conn.execute(delete(job_attempts).where(job_attempts.c.job_id.in_(ids))).rowcount or 0
        n_jobs = conn.execute(delete(jobs).where(jobs.c.id.in_(ids), jobs.c.status == "completed")).rowcount or 0
    return rolled, events, attempts, n_jobs


def completed_history(ledger: LedgerBase, queue: str, chunk: int = 1000
                      ) -> tuple[list[dict[str, Any]], Iterator[tuple[list[Any], list[Any]]]]:
    """The queue's ``job_daily`` rows, and its completed jobs still in the ledger as chunks of
    (job rows, attempt rows) like :func:`prune_batch` rolls up (read in one connection)."""
    with ledger.read_engine.connect() as conn:
        daily = [dict(r) for r in conn.execute(select(job_daily).where(job_daily.c.queue == queue)).mappings()]
        ids = [int(i) for i in conn.execute(select(jobs.c.id).where(jobs.c.queue == queue,
                                                                      jobs.c.status == "completed")).scalars()]
        chunks = [_completed_rows(conn, ids[start:start + chunk]) for start in range(0, len(ids), chunk)]
    return daily, iter(chunks)

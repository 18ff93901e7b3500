"""``worker_runs``: one row per burst (started, finished, abandoned), continued by a scheduled run's burst."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, insert, select, update

from qkit.engine import storable
from qkit.ledger.engine import LedgerBase, utcnow
from qkit.ledger.schema import jobs, worker_runs


class Runs(LedgerBase):
    """The bursts' records."""

    def start_run(self, worker: str, queue: str, trigger: str, params: dict[str, Any]) -> int:
        """The id of this burst's ``worker_runs`` row.

        A burst whose ``params`` carry a scheduled run's ``run_id`` continues the
        row its runner created (still unfinished); any other burst gets a new row.
        """
        run_id = params["run_id"][:64] if isinstance(params.get("run_id"), str) and params["run_id"] else None
        with self._write() as conn:
            if run_id is not None:
                row = conn.execute(select(worker_runs.c.id, worker_runs.c.params).where(
                    worker_runs.c.run_id == run_id, worker_runs.c.queue == queue, worker_runs.c.finished_at.is_(None))
                    .order_by(worker_runs.c.id).limit(1).with_for_update()).first()
                if row is not None:
                    conn.execute(update(worker_runs).where(worker_runs.c.id == row.id).values(
                        worker=worker, trigger=trigger, params={**(row.params or {}), **params}, status="running"))
                    return int(row.id)
            return int(conn.execute(insert(worker_runs).values(
                worker=worker, queue=queue, started_at=utcnow(), trigger=trigger, params=params, run_id=run_id,
                status="running").returning(worker_runs.c.id)).scalar_one())

    def finish_run(self, run_id: int, *, processed: int, completed: int, retried: int, failed: int,
                   status: str, error: str | None = None, released: int = 0) -> None:
        with self._write() as conn:
            conn.execute(update(worker_runs).where(worker_runs.c.id == run_id).values(
                finished_at=utcnow(), processed=processed, completed=completed, retried=retried, failed=failed,
                released=released, status=status, error=storable.text(error, self.driver.pg)))

    def waiting_retries(self, queue: str) -> tuple[int, float | None]:
        """What a burst leaves waiting: how many of the queue's jobs wait for a retry (pending after an
        attempt, not yet due) and in how many seconds the next is due (None if none)."""
        now = utcnow()
        waiting = (jobs.c.queue == queue) & (jobs.c.status == "pending") & (jobs.c.attempts > 0) & (jobs.c.run_at > now)
        with self.read_engine.connect() as conn:
            n, first = conn.execute(select(func.count(), func.min(jobs.c.run_at)).where(waiting)).one()
        if not n or first is None:
            return 0, None
        first = first if first.tzinfo else first.replace(tzinfo=timezone.utc)
        return int(n), round(max(0.0, (first - now).total_seconds()), 1)

    def running_runs(self, queue: str) -> list[tuple[int, str, datetime]]:
        """(id, worker, started_at) of the queue's ``worker_runs`` rows still marked ``running``."""
        with self.read_engine.connect() as conn:
            return [(int(r[0]), r[1], r[2]) for r in conn.execute(
                select(worker_runs.c.id, worker_runs.c.worker, worker_runs.c.started_at)
                .where(worker_runs.c.queue == queue, worker_runs.c.status == "running"))]

    def abandon_runs(self, reasons: dict[int, str]) -> int:
        """Close ``running`` rows of dead bursts as ``abandoned`` (id -> error); returns how many changed.

        Compare-and-set on the status: a row its burst closed meanwhile keeps what the burst wrote.
        """
        if not reasons:
            return 0
        now = utcnow()
        changed = 0
        with self._write() as conn:
            for run_id, reason in sorted(reasons.items()):
                changed += conn.execute(update(worker_runs).where(
                    worker_runs.c.id == run_id, worker_runs.c.status == "running").values(
                    finished_at=now, status="abandoned", error=reason)).rowcount
        return changed


    # ---------------------------------------------------------------- a scheduled run's record (qkit/runs/runrecord.py)
    def _insert_scheduled(self, conn: Any, worker: str, queue: str, started_at: datetime, run_id: str,
                          runner: dict[str, Any], **values: Any) -> None:
        conn.execute(insert(worker_runs).values(
            worker=worker, queue=queue, started_at=started_at, trigger="papermill", run_id=run_id,
            params={"run_id": run_id, "runner": runner}, **values))

    def open_scheduled_run(self, worker: str, queue: str, started_at: datetime, run_id: str,
                           runner: dict[str, Any]) -> None:
        """Create a scheduled run's ``worker_runs`` row (status ``running``) before its notebook starts."""
        with self.engine.begin() as conn:
            self._insert_scheduled(conn, worker, queue, started_at, run_id, runner, status="running")

    def close_scheduled_run(self, worker: str, queue: str, started_at: datetime, run_id: str,
                            runner: dict[str, Any], *, ok: bool, status: str, error: str | None,
                            finished_at: datetime) -> list[dict[str, Any]]:
        """Write the runner's verdict into the run's row(s), found by ``run_id``; returns the rows as written.

        ``status`` and ``error`` replace a row's own unless the run was ``ok``; then a row still
        ``running`` (the notebook never started a burst) becomes ``ok``.  A row the runner could
        not create at the start is created now.
        """
        by_run_id = select(worker_runs).where(worker_runs.c.run_id == run_id).order_by(worker_runs.c.id)
        with self.engine.begin() as conn:
            rows = conn.execute(by_run_id).mappings().all()
            if not rows:
                self._insert_scheduled(conn, worker, queue, started_at, run_id, runner, status=status, error=error,
                                       finished_at=finished_at)
                rows = conn.execute(by_run_id).mappings().all()
            for r in rows:
                values: dict[str, Any] = {"params": {**(r["params"] or {}), "runner": runner}}
                if not ok:
                    values.update(status=status, error=error)
                elif r["status"] == "running":  # the notebook never started a burst
                    values["status"] = "ok"
                if r["finished_at"] is None:
                    values["finished_at"] = finished_at
                conn.execute(update(worker_runs).where(worker_runs.c.id == r["id"]).values(**values))
        return [dict(r) for r in rows]

"""Handlers' progress reports (``qkit.current_job().progress``), written off the handler's thread.

The worker's :class:`qkit.engine.progress.ProgressBoard` throttles the reports
(at most one write per job per second, and the last one when the attempt
ends) and hands each batch here; the rows go to the ledger's background
writer (:class:`qkit.ledger.events.EventWriter`), so a handler never waits on
SQL.  A write is fenced by the job's attempt and replay epoch: a late report of
an attempt that a newer one replaced changes nothing.
"""
from __future__ import annotations

from datetime import datetime
from typing import Sequence

from sqlalchemy import bindparam, update

from qkit.engine import storable
from qkit.ledger.events import Events
from qkit.ledger.schema import jobs

PROGRESS_UPDATE = (update(jobs)
                   .where(jobs.c.id == bindparam("b_id"), jobs.c.attempts == bindparam("b_attempt"),
                          jobs.c.epoch == bindparam("b_epoch"))
                   .values(progress=bindparam("b_progress"), progress_note=bindparam("b_note"),
                           progress_at=bindparam("b_at")))


class Progress(Events):
    """Progress rows through the background writer."""

    def record_progress(self, reports: Sequence[tuple[int, int, int, float, str | None, datetime]]) -> None:
        """Queue (job id, attempt, epoch, fraction, note, at) rows for the background writer; never waits."""
        if not reports:
            return
        pg = self.dialect == "postgresql"
        rows = [dict(b_id=j, b_attempt=a, b_epoch=e, b_progress=f, b_note=storable.text(n, pg), b_at=at)
                for j, a, e, f, n, at in reports]
        self._event_writer().submit(rows, 0, statement=PROGRESS_UPDATE, quiet=True)

    def flush_background(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` s) until what the background writer holds is written."""
        with self._writer_lock:
            writer = self._writer
        return True if writer is None else writer.flush(timeout)

"""Repair drift between the ledger (truth) and Redis (dispatch index).

A crash between the ledger write and the Redis write of a step leaves them
disagreeing.  Each burst starts with a one-command check (counts per place
against counts per status); only when Redis holds fewer active jobs than the
ledger does it take a full snapshot and push the missing ones back.  Redis
entries the ledger does not know, or knows as finished, are harmless: a claim
drops them without running anything.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qkit.ledger import utcnow

if TYPE_CHECKING:
    from qkit.queue import Queue

log = logging.getLogger("qkit")


def repair_if_drifted(q: "Queue") -> dict[str, int]:
    """The cheap check at the start of every burst; repairs only when needed."""
    inv = q.dispatch.inventory()
    counts = q.ledger.status_counts(q.name)
    active_ledger = counts["pending"] + counts["processing"]
    active_redis = inv.ready + inv.delayed + inv.leased
    if active_redis >= active_ledger and inv.dead >= counts["failed"]:
        return {}
    return repair(q)


def repair(q: "Queue") -> dict[str, Any]:
    """Push every pending or processing job Redis lacks, and dead-letter failed ones it lacks.

    The Redis snapshot is read before the ledger, so a job that moves on
    meanwhile is at worst pushed once more, and a stale entry is dropped at
    claim time.  Returns counts of what was done.
    """
    snap = q.dispatch.snapshot()
    rows = q.ledger.active_rows(q.name)
    now = utcnow()
    missing_active: list[tuple[int, int, int]] = []
    missing_dead: list[int] = []
    for job_id, status, priority, run_at, _epoch in rows:
        place = snap.place_of(job_id)
        if status in ("pending", "processing") and place in (None, "dead"):
            # a processing job without a lease is reclaimed at claim time (attempt recorded as lost)
            delay_ms = 0 if status == "processing" else max(0, int((run_at - now).total_seconds() * 1000))
            missing_active.append((job_id, priority, delay_ms))
        elif status == "failed" and place is None:
            missing_dead.append(job_id)
    pushed = q.dispatch.push(missing_active, mode="repair") if missing_active else 0
    dead_lettered = q.dispatch.push([(j, 0, 0) for j in missing_dead], mode="dead") if missing_dead else 0
    if pushed or dead_lettered:
        log.warning("queue %s: repaired Redis from the ledger (%d pending pushed, %d dead-lettered)",
                    q.name, pushed, dead_lettered)
        q.ledger.add_events([dict(job_id=j, at=now, event="repaired", worker=None,
                                  detail={"action": "pushed"}) for j, _, _ in missing_active]
                            + [dict(job_id=j, at=now, event="repaired", worker=None,
                                    detail={"action": "dead-lettered"}) for j in missing_dead])
    return {"pushed": pushed, "dead_lettered": dead_lettered}

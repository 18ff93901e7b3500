"""Repair drift between the ledger (truth) and Redis (dispatch index).

A crash between the ledger write and the Redis write of a step leaves them
disagreeing.  Each burst starts with a one-command check (counts per place
against counts per status); only when Redis holds fewer active jobs than the
ledger does it take a full snapshot and push the missing ones back.  Redis
entries the ledger does not know, or knows as finished, are harmless: a claim
drops them without running anything (DLQ entries, which no claim reaches, are dropped
by the burst when the DLQ holds more entries than the ledger has failed rows and
they have no ledger row); ``qkit audit --repair`` (``repair(q,
drop=True)``, :mod:`qkit.ops.audit`) also takes them out, and after Redis lost a
queue's data it rebuilds the whole Redis side from the ledger.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qkit.ledger import reads, utcnow
from qkit.logs import log

if TYPE_CHECKING:
    from qkit.engine.queue import Queue



def repair_if_drifted(q: "Queue") -> dict[str, Any]:
    """The cheap check at the start of every burst; repairs only when needed.

    ``paused`` in the answer: the queue is paused (the ledger's record, put back in Redis if Redis
    lost it); a paused queue's burst claims nothing, and stops at this one command.
    """
    inv = q.dispatch.inventory()
    paused = sync_pause(q, inv.paused)
    if paused:
        return {"paused": True}
    counts = q.ledger.status_counts(q.name)
    active_ledger = counts["pending"] + counts["processing"]
    active_redis = inv.ready + inv.delayed + inv.leased
    if active_redis < active_ledger or inv.dead < counts["failed"]:
        return repair(q)
    if inv.dead > counts["failed"]:
        return {"dropped": drop_orphan_dead(q)}
    return {}


def sync_pause(q: "Queue", redis_paused: bool) -> bool:
    """Put the ledger's pause record (the truth) back in Redis if they differ; returns the ledger's."""
    paused = q.ledger.is_paused(q.name)
    if paused != redis_paused:
        q.dispatch.set_paused(paused)
        log.warning("queue %s: Redis's pause flag said %s, the ledger %s: restored from the ledger",
                    q.name, "paused" if redis_paused else "running", "paused" if paused else "running")
    return paused


def drop_orphan_dead(q: "Queue") -> int:
    """Take out the DLQ entries that have no ledger row; returns how many.

    A purge removes the entries before it deletes the rows, but Redis loses its last writes when it
    restarts (AOF fsync every second) or fails over, and the removal can come back.  No claim ever
    reaches a DLQ entry, so without this it would stay until ``qkit audit --repair``.  Ids are never
    reused: an entry without a row never gets one.  An entry whose job has a row (a replay between
    its ledger update and its push) is left alone.
    """
    dead = sorted(q.dispatch.snapshot().dead)
    orphans = sorted(set(dead) - set(_statuses(q, dead)))
    if orphans:
        q.dispatch.remove(orphans, scope="dead")
        log.warning("queue %s: dropped %d DLQ entr%s with no ledger row (Redis kept what a purge removed)",
                    q.name, len(orphans), "y" if len(orphans) == 1 else "ies")
    return len(orphans)


def repair(q: "Queue", *, drop: bool = False) -> dict[str, Any]:
    """Push every pending or processing job Redis lacks, and dead-letter failed ones it lacks.

    With ``drop`` (``qkit audit --repair``) it also takes out what Redis must
    not hold: entries with no ledger row in this queue, entries of completed
    jobs, failed jobs outside the DLQ (then dead-lettered), and jobs found in
    more than one place (then pushed again from the ledger).  An entry under a
    lease that is still valid is left alone: its worker settles it in its next
    call, and taking it away would let a second worker run the job.  After
    Redis lost the queue's data this is the full rebuild from the ledger.

    The Redis snapshot is read before the ledger, so a job that moves on
    meanwhile is at worst pushed once more, and a stale entry is dropped at
    claim time.  Returns counts of what was done (and ``actions``: job id ->
    what was done to it).
    """
    snap = q.dispatch.snapshot()
    sync_pause(q, q.dispatch.inventory().paused)
    rows = q.ledger.active_rows(q.name)
    now = utcnow()  # Redis's clock, as the snapshot just returned it
    dropped: dict[int, str] = _drop_stale(q, snap, {r[0]: r[1] for r in rows}) if drop else {}
    missing_active: list[tuple[int, int, int]] = []
    missing_dead: list[int] = []
    for job_id, status, priority, run_at, _epoch in sorted(rows):  # by id: a rebuild keeps FIFO order
        place = None if job_id in dropped else snap.place_of(job_id)
        if status in ("pending", "processing") and place in (None, "dead"):
            # a processing job without a lease is reclaimed at claim time (attempt recorded as lost)
            delay_ms = 0 if status == "processing" else max(0, int((run_at - now).total_seconds() * 1000))
            missing_active.append((job_id, priority, delay_ms))
        elif status == "failed" and place is None:
            missing_dead.append(job_id)
    pushed = q.dispatch.push(missing_active, mode="repair") if missing_active else 0
    dead_lettered = q.dispatch.push([(j, 0, 0) for j in missing_dead], mode="dead") if missing_dead else 0
    if missing_dead:  # a DLQ purge may have deleted some of them since they were read: no orphan entry
        purged = set(missing_dead) - set(_statuses(q, missing_dead))
        if purged:
            q.dispatch.remove(sorted(purged), scope="dead")
            missing_dead = [j for j in missing_dead if j not in purged]
            dead_lettered -= len(purged)
    actions: dict[int, str] = {j: f"dropped ({why})" for j, why in dropped.items()}
    actions.update({j: "pushed" for j, _, _ in missing_active})
    actions.update({j: "dead-lettered" for j in missing_dead})
    if pushed or dead_lettered:  # Redis lost jobs: it may have lost the limits' copy too
        from qkit.ops.limits import restore

        restore(q)
    if pushed or dead_lettered or dropped:
        log.warning("queue %s: repaired Redis from the ledger (%d pending pushed, %d dead-lettered, %d dropped)",
                    q.name, pushed, dead_lettered, len(dropped))
        # no event for an entry without a ledger row: there is no job to attach it to (only the log line)
        known = {r[0] for r in rows} | set(_statuses(q, dropped))
        q.ledger.add_events([dict(job_id=j, at=now, event="repaired", worker=None, detail={"action": what})
                             for j, what in sorted(actions.items()) if j in known])
    return {"pushed": pushed, "dead_lettered": dead_lettered, "dropped": len(dropped), "actions": actions}


def _statuses(q: "Queue", ids: Any) -> dict[int, str]:
    """Ledger status of each id that has a row in this queue (ids without one are left out)."""
    return reads.statuses(q.ledger, q.name, ids)


def _drop_stale(q: "Queue", snap: Any, active: dict[int, str]) -> dict[int, str]:
    """Remove the Redis entries the ledger says must not be there; returns id -> why."""
    places: dict[int, list[str]] = {}
    for name in ("ready", "delayed", "leased", "dead"):
        for job_id in getattr(snap, name):
            places.setdefault(job_id, []).append(name)
    unknown = [j for j in places if j not in active]
    status = {**_statuses(q, unknown), **active}
    why: dict[int, str] = {}
    for job_id, where in places.items():
        lease = snap.leased.get(job_id)
        if lease is not None and lease[0] > snap.now_ms:
            continue  # a valid lease: its worker settles it (or the claim drops it) in its next call
        st = status.get(job_id)
        if st is None:
            why[job_id] = "no ledger row"
        elif st in ("completed", "cancelled"):
            why[job_id] = st
        elif st == "failed" and where != ["dead"]:
            why[job_id] = "failed, not in the DLQ"
        elif len(where) > 1:
            why[job_id] = "in more than one place"
    if why:
        q.dispatch.remove(sorted(why), scope="all")
    return why


def close_abandoned_runs(q: "Queue") -> int:
    """Close as ``abandoned`` the queue's ``running`` worker_runs rows whose burst process is gone.

    A burst closes its own row; a row still ``running`` after its process died
    (SIGKILL, power loss) is closed here, by the next burst on the queue and by
    ``qkit audit --repair``.  Only rows of this host are judged: the worker id
    names the host and pid (:func:`qkit.engine.worker.burst_process`), and the burst is
    dead when no process has that pid, or the one that has it started after the
    row did (the pid was reused).  A live process's rows, including other bursts
    in this very process, are left alone; so are other hosts' rows, and (to be safe) a row whose pid
    now belongs to a younger Python process.
    """
    from qkit.engine.worker import burst_process, short_host

    host = short_host()
    reasons: dict[int, str] = {}
    for run_id, worker, started_at in q.ledger.running_runs(q.name):
        where = burst_process(worker)
        if where is None or where[0] != host or where[1] == os.getpid():
            continue  # another host's, or this live process's
        pid = where[1]
        import psutil  # only when there is a run to judge: a burst starts faster without it

        try:
            proc = psutil.Process(pid)
            # a process younger than the row reuses the pid (create_time has a 1 s grain); but a scheduled
            # run's row is opened by its runner before the kernel that bursts starts: a Python process counts
            alive = (proc.create_time() <= started_at.timestamp() + 1.0
                     or proc.name().lower().startswith("python"))
        except psutil.NoSuchProcess:
            alive = False
        except psutil.Error:
            alive = True  # cannot tell (e.g. access denied): assume it lives
        if not alive:
            reasons[run_id] = f"abandoned: process {pid} on {host} ended without closing its run"
    closed = q.ledger.abandon_runs(reasons)
    if closed:
        log.warning("queue %s: closed %d worker run(s) left running by a process that is gone", q.name, closed)
    return closed

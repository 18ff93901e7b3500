"""The soak's accounting (``bench/soak.py``): what the nemesis' admin actions and replays change
about the total-queue check, before :func:`qkit.ops.audit.total_queue` runs.

* **Purges are deletions, not losses.**  An id that an admin purge returned (the ids the
  ledger deleted) is accounted for: it leaves the acknowledged set, and its executions are not
  "unexpected".  One exception is a *lost replay*: a replay returned the id (acknowledged
  "this job will run again"), then a purge deleted it before any handler of it started again.
  With a purge that re-checks the status, a purge can only delete a replayed job after it ran
  and failed again, which needs at least one handler start after the replay began; a purged id
  without one is counted lost.
* **Replays start a new epoch.**  A replay resets the attempt count, so attempt numbers repeat.
  Each execution is placed in its epoch through the ledger's attempt rows: the handler logs its
  worker id (one per burst), and the rows of ``(job, attempt, worker)`` give the epochs, in
  order (a burst runs each attempt of an epoch at most once).  Executions of the job's current
  epoch go to ``total_queue``; those of earlier epochs are explained by the replay only if the
  ledger recorded that attempt ``lost`` or ``timeout`` (an earlier epoch ended ``failed``, so a
  run that returned and was recorded ``failed`` there is a wasted success and counts as
  unexplained).
* **A lost attempt is excused only by a death the nemesis caused.**  A run that returned, in an
  epoch that ended ``failed``, whose attempt the ledger recorded ``lost`` while the worker that
  ran it was not SIGKILLed by the nemesis (it crashed on another job's data, or gave up during
  an outage), is a wasted success (``Accounting.wasted``), on top of those ``total_queue`` counts.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import func, select

from qkit.ledger import job_attempts, jobs


@dataclass
class AdminAction:
    action: str
    t0: int  # monotonic ns
    t1: int
    ids: list[int]
    error: str | None


@dataclass
class Accounting:
    purged: set[int] = field(default_factory=set)
    lost_replays: list[int] = field(default_factory=list)  # replayed, then purged without running again
    current: list[tuple[int, int]] = field(default_factory=list)  # (job, attempt): for total_queue
    earlier: int = 0  # executions of an earlier epoch (explained by the replay when lost/timeout)
    earlier_unexplained: list[tuple[int, int, int]] = field(default_factory=list)  # (job, epoch, attempt)
    replayed_jobs: int = 0  # jobs in the ledger whose epoch is > 0
    replay_acks: int = 0  # ids returned by replay calls
    wasted: list[int] = field(default_factory=list)  # failed jobs with a run that returned, recorded lost
    # although the nemesis did not kill its worker (the worker crashed or gave up: a wasted success)
    actions: dict[str, int] = field(default_factory=dict)  # per action: how many returned
    refused: dict[str, int] = field(default_factory=dict)  # per action: how many raised


def read_actions(lines: Iterable[str]) -> list[AdminAction]:
    import json

    out = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:  # a torn last line
            continue
        out.append(AdminAction(r["action"], r["t0"], r.get("t1", r["t0"]), [int(i) for i in r.get("ids") or []],
                               r.get("error")))
    return out


def account(q: Any, rows: list[Any], actions: list[AdminAction], killed: set[int] = frozenset()) -> Accounting:
    """``rows``: the handler log (``soak_handlers.read_log``); ``actions``: every admin action;
    ``killed``: the pids the nemesis SIGKILLed (a ``lost`` attempt of theirs is excused)."""
    acc = Accounting()
    purges = [a for a in actions if a.action == "purge" and a.error is None]
    replays = [a for a in actions if a.action.startswith("replay") and a.error is None]
    acc.actions = dict(Counter(a.action for a in actions if a.error is None))
    acc.refused = dict(Counter(a.action for a in actions if a.error is not None))
    acc.replay_acks = sum(len(a.ids) for a in replays)
    starts: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        if r.what == "start":
            starts[r.job_id].append(r.mono_ns)
    for purge in purges:
        for job_id in purge.ids:
            acc.purged.add(job_id)
            before = [r for r in replays if job_id in r.ids and r.t0 < purge.t1]
            if before:
                since = max(r.t0 for r in before)
                if not any(t > since for t in starts.get(job_id, ())):
                    acc.lost_replays.append(job_id)
    acc.lost_replays = sorted(set(acc.lost_replays))

    done = [r for r in rows if r.what == "done" and r.job_id not in acc.purged]
    ids = sorted({r.job_id for r in done})
    epochs_of: dict[tuple[int, int, str], list[tuple[int, str | None]]] = defaultdict(list)
    current_epoch: dict[int, int] = {}
    status: dict[int, str] = {}
    with q.ledger.read_engine.connect() as conn:
        acc.replayed_jobs = len(conn.execute(select(jobs.c.id).where(jobs.c.queue == q.name, jobs.c.epoch > 0)).all())
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for r in conn.execute(select(jobs.c.id, jobs.c.epoch, jobs.c.status).where(jobs.c.id.in_(chunk))):
                current_epoch[r.id], status[r.id] = r.epoch, r.status
            for r in conn.execute(select(job_attempts.c.job_id, job_attempts.c.attempt, job_attempts.c.worker,
                                         job_attempts.c.epoch, job_attempts.c.outcome)
                                  .where(job_attempts.c.job_id.in_(chunk))):
                epochs_of[(r.job_id, r.attempt, r.worker)].append((r.epoch, r.outcome))
    for rows_of in epochs_of.values():
        rows_of.sort()
    used: Counter[tuple[int, int, str]] = Counter()
    wasted: set[int] = set()
    for r in done:
        key = (r.job_id, r.attempt, r.worker)
        candidates = epochs_of.get(key, [])
        k = used[key]
        used[key] += 1
        epoch, outcome = candidates[k] if k < len(candidates) else (None, None)
        current = epoch is None or r.job_id not in current_epoch or epoch >= current_epoch[r.job_id]
        # an epoch that ended failed (an earlier one, or the current one of a failed job): a run that
        # returned there is excused only by its worker's death at the nemesis' hand
        if outcome == "lost" and r.pid not in killed and (not current or status.get(r.job_id) == "failed"):
            wasted.add(r.job_id)
        if current:  # the current epoch, or no attempt row at all: total_queue judges it
            acc.current.append((r.job_id, r.attempt))
        else:
            acc.earlier += 1
            if outcome not in ("lost", "timeout"):
                acc.earlier_unexplained.append((r.job_id, epoch, r.attempt))
    acc.wasted = sorted(wasted)
    return acc


def story(q: Any, rows: list[Any], actions: list[AdminAction], job_id: int) -> list[str]:
    """A job's story for a bug report: its handler lines and the admin actions that named it
    (in monotonic order, seconds), then what the ledger holds of it (attempts and events)."""
    from qkit.ledger import job_events

    told = [(r.mono_ns, f"{r.what} attempt {r.attempt} by {r.worker}") for r in rows if r.job_id == job_id]
    told += [(a.t0, f"{a.action} returned it ({(a.t1 - a.t0) / 1e6:.0f} ms)") for a in actions if job_id in a.ids]
    out = [f"{t / 1e9:.3f} {what}" for t, what in sorted(told)]
    with q.ledger.read_engine.connect() as conn:
        job = conn.execute(select(jobs.c.status, jobs.c.epoch, jobs.c.attempts).where(jobs.c.id == job_id)).first()
        out.append("ledger: no row" if job is None else f"ledger: {job.status}, epoch {job.epoch}, attempts {job.attempts}")
        out += [f"ledger attempt epoch {r.epoch} #{r.attempt} by {r.worker}: {r.outcome or 'open'}" for r in conn.execute(
            select(job_attempts.c.epoch, job_attempts.c.attempt, job_attempts.c.worker, job_attempts.c.outcome)
            .where(job_attempts.c.job_id == job_id).order_by(job_attempts.c.epoch, job_attempts.c.attempt))]
        out += [f"ledger event {r.at:%H:%M:%S.%f} {r.event}" for r in conn.execute(
            select(job_events.c.at, job_events.c.event).where(job_events.c.job_id == job_id)
            .order_by(job_events.c.at))]
    return out


_PID = re.compile(r"-(\d+)-[0-9a-f]{8}$")  # a worker id ends with its pid and 8 hex digits


@dataclass
class AttemptOutcomes:
    attempts: dict[str, int]  # attempt rows by outcome ("open" for none yet)
    lost_by: dict[str, int]  # lost attempts by how their worker ended: killed, live, exit N, unknown
    lost_not_started: int  # lost attempts whose handler never began (batch-mates of the job in hand)
    lost_pids: set[int]  # the worker processes that left a lost attempt


def attempt_outcomes(q: Any, rows: list[Any], exits: dict[int, tuple[bool, int]]) -> AttemptOutcomes:
    """The queue's attempt rows by outcome, and its lost attempts by how their worker ended.

    ``exits``: pid -> (killed by the nemesis, exit code).  "live": the worker exited 0, so its lease
    expired while it ran, which renewal must prevent; "exit N": it ended on an error (e.g. Redis gone).
    """
    with q.ledger.read_engine.connect() as conn:
        joined = job_attempts.join(jobs, jobs.c.id == job_attempts.c.job_id)
        outcomes = conn.execute(select(job_attempts.c.outcome, func.count()).select_from(joined)
                                .where(jobs.c.queue == q.name).group_by(job_attempts.c.outcome)).all()
        lost_rows = conn.execute(select(job_attempts.c.worker, job_attempts.c.job_id, job_attempts.c.attempt)
                                 .select_from(joined).where(jobs.c.queue == q.name,
                                                            job_attempts.c.outcome == "lost")).all()
    started = {(r.job_id, r.attempt) for r in rows if r.what == "start"}
    lost_by: Counter[str] = Counter()
    pids: set[int] = set()
    for worker, _, _ in lost_rows:
        m = _PID.search(worker)
        pid = int(m.group(1)) if m else None
        if pid is not None:
            pids.add(pid)
        killed, code = exits.get(pid, (None, None))
        lost_by["unknown" if killed is None else "killed" if killed else "live" if code == 0 else f"exit {code}"] += 1
    return AttemptOutcomes(attempts={(k or "open"): int(n) for k, n in outcomes}, lost_by=dict(lost_by),
                           lost_not_started=sum(1 for _, j, a in lost_rows if (j, a) not in started), lost_pids=pids)


def poison_outcomes(q: Any, poison: dict[int, str], purged: set[int]) -> tuple[dict[str, int], list[str]]:
    """``"kind status"`` -> jobs, for the poison jobs (id -> kind); and a problem for each one that
    failed without its own error recorded (one job's data must not cost it its error)."""
    with q.ledger.read_engine.connect() as conn:
        found = conn.execute(select(jobs.c.id, jobs.c.status, jobs.c.error)
                             .where(jobs.c.id.in_(list(poison)))).all() if poison else []
    statuses = Counter(f"{poison[r.id]} {r.status}" for r in found)
    statuses.update(f"{poison[i]} purged" for i in poison if i in purged)
    problems = [f"poison job {r.id} ({poison[r.id]}) failed with no error recorded" for r in found
                if poison[r.id].endswith("-error") and r.status == "failed" and not r.error]
    return dict(sorted(statuses.items())), problems

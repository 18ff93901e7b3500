"""``qkit audit``: do Redis and the ledger agree, and does the ledger keep its promises?

The checks are the G1-G8 audit invariants (docs/semantics.md#audit-invariants),
for one queue:

* Redis against the ledger (G2, G7): every pending job is ready or delayed,
  every processing job is leased, every failed job is in the DLQ, a completed
  job is nowhere, and nothing in Redis lacks a ledger row.
* The ledger alone (G3-G6, G8): ``jobs.attempts`` equals the attempt rows of
  the current replay epoch and is at most ``max_attempts``; ``completed`` iff
  exactly one completed attempt in the epoch; every attempt but the last ended
  ``failed``/``timeout``/``lost``, and the last one agrees with the status;
  only the four status words; created <= started <= finished; no attempt
  began before the one it replaced had ended.

A finding is an *error* (the two sides disagree, or an invariant is broken)
or a *notice* (a state that is correct but worth knowing and that the next
burst resolves on its own: an expired lease waiting to be reclaimed, a claim
or a settlement in flight).  ``clean`` means no error.  ``repair=True`` runs
:func:`qkit.ops.reconcile.repair` with ``drop=True`` (push, dead-letter, drop
stale entries; a full rebuild when Redis lost the queue's data), records what
it did as ``repaired`` events, and checks again.  Ledger errors are never
"repaired" by guessing: they are reported.

Each check is one SQL query returning only the offending rows, plus one Redis
snapshot; nothing is read per job.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

from qkit.ledger import checks, utcnow
from qkit.ledger.reads import statuses
from qkit.model import OUTCOMES

if TYPE_CHECKING:
    from qkit.engine.queue import Queue

#: code -> (severity, what it means, what ``--repair`` does or None)
CODES: dict[str, tuple[str, str, str | None]] = {
    # Redis against the ledger
    "redis_lost_data": ("error", "Redis holds nothing for this queue while the ledger has active jobs",
                        "rebuild the queue's Redis side from the ledger"),
    "pending_missing": ("error", "pending in the ledger, but neither ready nor delayed in Redis", "push it"),
    "pending_in_dlq": ("error", "pending in the ledger, but in the Redis DLQ", "push it back to ready"),
    "processing_not_leased": ("error", "processing in the ledger, but no lease in Redis",
                              "push it (its claim then records the attempt as lost)"),
    "failed_not_in_dlq": ("error", "failed in the ledger, but not in the Redis DLQ", "dead-letter it"),
    "terminal_entry": ("error", "completed or cancelled in the ledger, but still in Redis", "drop the entry"),
    "pause_mismatch": ("error", "the ledger and Redis disagree on whether the queue is paused",
                       "restore Redis's pause flag from the ledger"),
    "orphan_entry": ("error", "in Redis, but no ledger row in this queue", "drop the entry"),
    "duplicate_entry": ("error", "in more than one place in Redis", "drop and push again from the ledger"),
    "limits_drift": ("error", "Redis's copy of the limits per type differs from the ledger's",
                     "restore Redis's copy from the ledger"),
    # the ledger alone
    "bad_status": ("error", "status is not one of pending, processing, completed, failed, cancelled", None),
    "bad_outcome": ("error", "an attempt outcome is not completed, failed, timeout, lost (or open)", None),
    "bad_timestamps": ("error", "timestamps out of order (created <= started <= finished)", None),
    "attempts_mismatch": ("error", "jobs.attempts differs from the attempt rows of the current epoch", None),
    "attempts_over_max": ("error", "more attempts than max_attempts", None),
    "completed_mismatch": ("error", "status completed iff exactly one completed attempt in the epoch", None),
    "unexplained_attempt": ("error", "an attempt before the last did not end failed, timeout or lost", None),
    "final_attempt_mismatch": ("error", "the last attempt's outcome disagrees with the job's status", None),
    "overlap": ("error", "an attempt began before the attempt it replaced had ended", None),
    # correct states that the next burst resolves
    "lease_expired": ("notice", "leased by a worker whose lease expired; the next burst reclaims it", None),
    "awaiting_reclaim": ("notice", "processing, back in ready after a repair; its claim records the lost attempt",
                         None),
    "claim_in_flight": ("notice", "pending, leased with a valid lease: a worker is recording its claim", None),
    "settle_in_flight": ("notice", "finished, still leased with a valid lease: its worker settles it next call",
                         None),
}

#: clock-skew allowance between worker hosts for the overlap check (ledger times come from
#: the workers' clocks; leases use Redis's): a real double claim overlaps by a whole lease
OVERLAP_TOLERANCE_S = 0.25


@dataclass
class Finding:
    """One thing the audit found about one job (``job_id`` None: about the whole queue)."""

    code: str
    job_id: int | None
    message: str

    @property
    def severity(self) -> str:
        return CODES[self.code][0]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "job_id": self.job_id, "message": self.message}


@dataclass
class AuditReport:
    """What ``audit`` found (after repair, when it repaired) for one queue."""

    queue: str
    at: datetime
    jobs: int  # ledger rows of the queue
    redis_entries: int
    findings: list[Finding] = field(default_factory=list)
    found_before_repair: dict[str, int] | None = None  # counts per code, when repair ran
    repaired: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def notices(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "notice"]

    @property
    def clean(self) -> bool:
        """True when no error remains (notices are fine: the next burst resolves them)."""
        return not self.errors

    @property
    def counts(self) -> dict[str, int]:
        """Findings per code, errors first."""
        c = Counter(f.code for f in self.findings)
        return dict(sorted(c.items(), key=lambda kv: (CODES[kv[0]][0] != "error", kv[0])))

    def for_job(self, job_id: int) -> list[Finding]:
        return [f for f in self.findings if f.job_id == job_id]

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "at": self.at.isoformat(), "clean": self.clean, "jobs": self.jobs,
                "redis_entries": self.redis_entries, "counts": self.counts,
                "errors": len(self.errors), "notices": len(self.notices),
                "found_before_repair": self.found_before_repair, "repaired": self.repaired,
                "findings": [f.to_dict() for f in self.findings]}

    def summary(self) -> str:
        """Counts per finding, one line each, for people."""
        head = (f"queue {self.queue}: {self.jobs} job(s) in the ledger, {self.redis_entries} Redis entr"
                f"{'y' if self.redis_entries == 1 else 'ies'}: "
                + ("clean" if self.clean else f"{len(self.errors)} error(s)")
                + (f", {len(self.notices)} notice(s)" if self.notices else ""))
        lines = [head]
        if self.found_before_repair is not None:
            lines.append("  repaired: " + (", ".join(f"{k} {v}" for k, v in self.repaired.items() if v) or "nothing"))
        for code, n in self.counts.items():
            severity, meaning, fix = CODES[code]
            ids = [str(f.job_id) for f in self.findings if f.code == code and f.job_id is not None]
            sample = f" (e.g. {', '.join(ids[:5])}{', …' if len(ids) > 5 else ''})" if ids else ""
            hint = f"; --repair: {fix}" if fix and severity == "error" else ""
            lines.append(f"  {severity:<6} {code:<22} {n:>6}  {meaning}{sample}{hint}")
        return "\n".join(lines)


# ---------------------------------------------------------------- Redis against the ledger
def place_findings(job_id: int, status: str | None, places: dict[str, Any], now_ms: int) -> list[Finding]:
    """Findings for one job from where Redis holds it.

    ``places``: ``ready`` (bool), ``delayed`` (due ms or None), ``leased``
    ((deadline ms, owner) or None), ``dead`` (bool).  Shared by :func:`audit`
    (from the snapshot) and :mod:`qkit.ops.explain` (from ``locate.lua``), so both
    say the same thing about a job.
    """
    where = [p for p in ("ready", "delayed", "leased", "dead") if places.get(p) not in (None, False)]
    lease = places.get("leased")
    valid = lease is not None and lease[0] > now_ms
    owner = lease[1] if lease else None
    expired_for = f"{(now_ms - lease[0]) / 1000:.1f} s ago" if lease and not valid else ""
    out: list[Finding] = []

    def add(code: str, message: str) -> None:
        out.append(Finding(code, job_id, message))

    if status is None:
        if where:
            add("orphan_entry", f"job {job_id} is in {'+'.join(where)} but has no ledger row in this queue")
        return out
    if len(where) > 1:
        add("duplicate_entry", f"job {job_id} ({status}) is in {' and '.join(where)}")
        return out
    place = where[0] if where else None
    if status == "pending":
        if place == "dead":
            add("pending_in_dlq", f"job {job_id} is pending but in the DLQ")
        elif place is None:
            add("pending_missing", f"job {job_id} is pending but not in Redis")
        elif place == "leased":
            if valid:
                add("claim_in_flight", f"job {job_id} is pending, leased to {owner}")
            else:
                add("lease_expired", f"job {job_id} is pending, leased to {owner} whose lease expired {expired_for}")
    elif status == "processing":
        if place in (None, "dead"):
            add("processing_not_leased", f"job {job_id} is processing but has no lease"
                + (" (it is in the DLQ)" if place == "dead" else ""))
        elif place == "leased" and not valid:
            add("lease_expired", f"job {job_id} is processing, leased to {owner} whose lease expired {expired_for}")
        elif place in ("ready", "delayed"):
            add("awaiting_reclaim", f"job {job_id} is processing and {place}: its claim records the lost attempt")
    elif status in ("completed", "cancelled"):
        if place == "leased" and valid:
            add("settle_in_flight", f"job {job_id} is {status}, still leased to {owner}")
        elif place is not None:
            add("terminal_entry", f"job {job_id} is {status} but still {place} in Redis")
    elif status == "failed":
        if place == "leased" and valid:
            add("settle_in_flight", f"job {job_id} is failed, still leased to {owner}")
        elif place != "dead":
            add("failed_not_in_dlq", f"job {job_id} is failed but {place or 'not in Redis'}")
    return out


def _places(snap: Any) -> dict[int, dict[str, Any]]:
    """job id -> where a snapshot holds it, in the form :func:`place_findings` takes."""
    places: dict[int, dict[str, Any]] = {}
    for job_id in snap.ready:
        places.setdefault(job_id, {})["ready"] = True
    for job_id, due in snap.delayed.items():
        places.setdefault(job_id, {})["delayed"] = due
    for job_id, lease in snap.leased.items():
        places.setdefault(job_id, {})["leased"] = lease
    for job_id in snap.dead:
        places.setdefault(job_id, {})["dead"] = True
    return places


def redis_findings(q: "Queue") -> tuple[list[Finding], int, int]:
    """Compare a Redis snapshot with the ledger; returns (findings, ledger rows, Redis entries).

    Redis is read before the ledger (the order of every write is ledger
    first), and each finding about a job is confirmed by a second look — a
    new snapshot, then the job's row again — so a job enqueued, claimed or
    settled while the audit ran is not reported.
    """
    snap = q.dispatch.snapshot()
    total, active = checks.queue_totals(q.ledger, q.name)
    places = _places(snap)
    pause_finding = _pause_finding(q)
    status = dict(active)
    others = [j for j in places if j not in status]
    if others:
        status.update(statuses(q.ledger, q.name, others))
    findings: list[Finding] = []
    if not places and any(s in ("pending", "processing", "failed") for s in active.values()):
        n = sum(1 for s in active.values() if s in ("pending", "processing", "failed"))
        findings.append(Finding("redis_lost_data", None, f"Redis holds no entry for queue {q.name!r} while the "
                                                         f"ledger has {n} pending, processing or failed job(s)"))
    for job_id in sorted(set(status) | set(places)):
        findings += place_findings(job_id, status.get(job_id), places.get(job_id, {}), snap.now_ms)
    suspects = {f.job_id for f in findings if f.job_id is not None}
    if suspects:
        snap2 = q.dispatch.snapshot()
        places2, status2 = _places(snap2), statuses(q.ledger, q.name, suspects)
        confirmed = {(f.code, f.job_id) for j in suspects
                     for f in place_findings(j, status2.get(j), places2.get(j, {}), snap2.now_ms)}
        findings = [f for f in findings if f.job_id is None or (f.code, f.job_id) in confirmed]
    if pause_finding is not None and _pause_finding(q) is not None:  # confirmed by a second look too
        findings.append(pause_finding)
    return findings, total, len(places)


def _pause_finding(q: "Queue") -> Finding | None:
    redis_paused, ledger_paused = q.dispatch.inventory().paused, q.ledger.is_paused(q.name)
    if redis_paused == ledger_paused:
        return None
    return Finding("pause_mismatch", None, f"queue {q.name!r} is {'paused' if ledger_paused else 'not paused'} in "
                                           f"the ledger but {'paused' if redis_paused else 'not paused'} in Redis")


# ---------------------------------------------------------------- the ledger alone
def ledger_findings(q: "Queue", job_ids: Iterable[int] | None = None) -> list[Finding]:
    """G3-G6 and G8 on the ledger rows of the queue (or only ``job_ids``)."""
    ids = None if job_ids is None else [int(i) for i in job_ids]
    rows = checks.invariant_rows(q.ledger, q.name, ids)
    out: list[Finding] = []
    # G8: status words
    for r in rows["bad_status"]:
        out.append(Finding("bad_status", r.id, f"job {r.id} has status {r.status!r}"))
    # G5 / G3: attempt counts of the current epoch
    for r in rows["counted"]:
        if r.n != r.attempts:
            out.append(Finding("attempts_mismatch", r.id, f"job {r.id} has attempts={r.attempts} but {r.n} "
                                                          "attempt row(s) in its current epoch"))
        if r.attempts > r.max_attempts:
            out.append(Finding("attempts_over_max", r.id,
                               f"job {r.id} has attempts={r.attempts} > max_attempts={r.max_attempts}"))
        if (r.done > 1 or (r.status == "completed" and r.done != 1)
                or (r.status not in ("completed", "cancelled") and r.done > 0)):
            out.append(Finding("completed_mismatch", r.id, f"job {r.id} is {r.status} with {r.done} completed "
                                                           "attempt(s) in its current epoch"))
    # G4 and the last attempt against the status
    for r in rows["attempts"]:
        label = f"attempt {r.attempt}" + (f" of epoch {r.epoch}" if r.epoch != r.cur else "")
        if r.outcome is not None and r.outcome not in OUTCOMES:
            out.append(Finding("bad_outcome", r.job_id, f"job {r.job_id} {label} has outcome {r.outcome!r}"))
        elif r.epoch < r.cur or r.attempt < r.cur_attempts:
            out.append(Finding("unexplained_attempt", r.job_id, f"job {r.job_id} {label} ended "
                               f"{r.outcome or 'never (still open)'} but a later attempt ran"))
        else:
            out.append(Finding("final_attempt_mismatch", r.job_id, f"job {r.job_id} is {r.status} but its last "
                               f"{label} is {r.outcome or 'open'}"))
    # G8: time order (UTC by construction: the column type refuses naive times)
    for r in rows["job_times"]:
        out.append(Finding("bad_timestamps", r.id, f"job {r.id}: created {_t(r.created_at)}, started "
                                                   f"{_t(r.started_at)}, finished {_t(r.finished_at)}"))
    for r in rows["attempt_times"]:
        out.append(Finding("bad_timestamps", r.job_id, f"job {r.job_id} attempt {r.attempt} finished "
                                                       f"{_t(r.finished_at)} before it started {_t(r.started_at)}"))
    # G6: an attempt begins only once the one before it has ended (lost: at its reclaim)
    for r in rows["overlaps"]:
        gap = (r.finished_at - r.next_start).total_seconds()
        if gap > OVERLAP_TOLERANCE_S:
            out.append(Finding("overlap", r.job_id, f"job {r.job_id} attempt {r.attempt + 1} started "
                                                    f"{gap:.3f} s before attempt {r.attempt} ended"))
    return out


def _t(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


# ---------------------------------------------------------------- the whole audit
def check(q: "Queue") -> AuditReport:
    """Run every check once (no repair)."""
    at = utcnow()
    found, total, entries = redis_findings(q)
    found += ledger_findings(q)
    from qkit.ops.limits import drift

    found += [Finding("limits_drift", None, line) for line in drift(q)]
    return AuditReport(queue=q.name, at=at, jobs=total, redis_entries=entries, findings=found)


def audit(q: "Queue", repair: bool = False) -> AuditReport:
    """Check that Redis and the ledger agree (G1-G8); with ``repair``, fix what can be fixed and check again.

    Safe while bursts run: it never touches an entry under a valid lease.
    What a repair did is recorded as ``repaired`` events on the jobs.
    """
    report = check(q)
    if not repair:
        return report
    before = report.counts
    fixable = [f for f in report.errors if CODES[f.code][2] is not None]
    repaired: dict[str, int] = {"pushed": 0, "dead_lettered": 0, "dropped": 0}
    if fixable:
        from qkit.ops.reconcile import repair as reconcile_repair

        done = reconcile_repair(q, drop=True)
        repaired = {k: int(done.get(k, 0)) for k in repaired}
    if any(f.code == "limits_drift" for f in report.errors):
        from qkit.ops.limits import restore

        repaired["limits_restored"] = restore(q)["limits"]
    from qkit.ops.reconcile import close_abandoned_runs

    abandoned = close_abandoned_runs(q)  # worker_runs rows of dead bursts
    if abandoned:
        repaired["runs_abandoned"] = abandoned
    report = check(q)
    report.found_before_repair = before
    report.repaired = repaired
    return report


# ---------------------------------------------------------------- Jepsen's total-queue check
@dataclass
class TotalQueueReport:
    """Jepsen ``total-queue`` counts for one queue after a run (drain it first), plus the G1-G8 audit.

    * ``lost``: acknowledged enqueues whose job is not terminal (or has no row);
    * ``unexpected``: handler executions of ids with no ledger row in the queue;
    * ``duplicated``: jobs whose handler ran to the end more than once;
    * ``unexplained``: those extra executions, ``(job_id, epoch, attempt)``, that no
      ``lost``/``timeout`` attempt accounts for (G4; must be empty);
    * ``recovered``: ledger rows of enqueues that were attempted but not
      acknowledged (the client died or got an error), which ended terminal;
    * ``wasted_success``: jobs recorded ``failed`` although a handler execution
      of theirs returned, with no process death to explain it (must be empty).
    """

    queue: str
    acknowledged: int
    lost: list[int]
    unexpected: list[int]
    duplicated: list[int]
    unexplained: list[tuple[int, int, int]]
    recovered: list[int]
    audit: AuditReport
    wasted_success: list[int] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """lost = unexpected = wasted_success = 0, every duplicate explained, and the G1-G8 audit clean."""
        return not (self.lost or self.unexpected or self.unexplained or self.wasted_success) and self.audit.clean

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "valid": self.valid, "acknowledged": self.acknowledged,
                "lost": len(self.lost), "unexpected": len(self.unexpected), "duplicated": len(self.duplicated),
                "unexplained": len(self.unexplained), "recovered": len(self.recovered),
                "wasted_success": len(self.wasted_success),
                "audit_errors": len(self.audit.errors), "audit_counts": self.audit.counts,
                "ids": {"lost": self.lost, "unexpected": self.unexpected, "duplicated": self.duplicated,
                        "unexplained": [list(x) for x in self.unexplained], "recovered": self.recovered,
                        "wasted_success": self.wasted_success}}

    def summary(self) -> str:
        """One line: the Jepsen counts and the audit verdict."""
        explained = "all explained" if not self.unexplained else f"{len(self.unexplained)} UNEXPLAINED"
        verdict = "audit clean" if self.audit.clean else f"audit: {len(self.audit.errors)} error(s) {self.audit.counts}"
        return (f"{self.acknowledged} acknowledged: lost {len(self.lost)} · unexpected {len(self.unexpected)} · "
                f"duplicated {len(self.duplicated)} ({explained}) · recovered {len(self.recovered)} · "
                f"wasted-success {len(self.wasted_success)} · {verdict}")


def total_queue(q: "Queue", acknowledged: Iterable[int], executions: Iterable[tuple[int, int]] = (),
                attempted: Iterable[int] = (), epochs: dict[tuple[int, int], int] | None = None,
                deaths_expected: bool = False) -> TotalQueueReport:
    """Check a drained queue the way Jepsen's total-queue checker checks a queue.

    ``acknowledged``: ids that enqueue calls returned.  ``executions``: one
    ``(job_id, attempt)`` per handler call that ran to its end (what a side-effect
    log records; the attempt is ``qkit.current_job().attempt``).  ``attempted``:
    ids whose enqueue may have landed without an answer (e.g. ids read back by
    idempotency key after the enqueuing process died).  Executions are taken to
    belong to the job's current replay epoch unless ``epochs`` maps
    ``(job_id, attempt)`` to another.
    An execution is *explained* when it is the attempt the ledger completed, or
    an attempt the ledger recorded as ``lost`` or ``timeout`` (its result was
    never recorded, so running the job again was right).
    A ``failed`` job with an execution is a *wasted success* unless that
    attempt is recorded as ``timeout`` (the handler returned past its timeout)
    or, when ``deaths_expected`` (the scenario killed or stopped processes), as
    ``lost``: without a death, a returned handler's outcome must be recorded.
    """
    acked = sorted(set(int(i) for i in acknowledged))
    runs = Counter((int(j), int(a)) for j, a in executions)
    by_job: dict[int, list[int]] = {}
    for (job_id, attempt), n in runs.items():
        by_job.setdefault(job_id, []).extend([attempt] * n)
    status, outcomes = checks.job_states(q.ledger, q.name, set(acked) | set(by_job) | {int(i) for i in attempted})
    terminal = ("completed", "failed", "cancelled")
    lost = [i for i in acked if status.get(i, ("missing", 0))[0] not in terminal]
    unexpected = sorted(j for j in by_job if j not in status)
    duplicated = sorted(j for j, attempts in by_job.items() if len(attempts) > 1 and j in status)
    unexplained: list[tuple[int, int, int]] = []
    for job_id, attempts in sorted(by_job.items()):
        if job_id not in status:
            continue
        seen: Counter[tuple[int, int]] = Counter()
        for attempt in attempts:
            epoch = (epochs or {}).get((job_id, attempt), status[job_id][1])
            seen[(epoch, attempt)] += 1
            outcome = outcomes.get((job_id, epoch, attempt))
            # one run per attempt, ending as the ledger says; a second run of the same attempt is never right
            if seen[(epoch, attempt)] > 1 or outcome not in ("completed", "lost", "timeout"):
                unexplained.append((job_id, epoch, attempt))
    recovered = sorted(i for i in {int(x) for x in attempted} - set(acked)
                       if status.get(i, ("missing", 0))[0] in terminal)
    excused = ("timeout", "lost") if deaths_expected else ("timeout",)
    wasted = sorted(j for j, attempts in by_job.items() if status.get(j, ("missing", 0))[0] == "failed" and any(
        outcomes.get((j, (epochs or {}).get((j, a), status[j][1]), a)) not in excused for a in attempts))
    return TotalQueueReport(queue=q.name, acknowledged=len(acked), lost=lost, unexpected=unexpected,
                            duplicated=duplicated, unexplained=unexplained, recovered=recovered, audit=check(q),
                            wasted_success=wasted)

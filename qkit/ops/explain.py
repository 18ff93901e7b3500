"""``qkit explain ID``: where a job is and why, in plain words.

Joins the four records of a job — its ledger row, its attempts (with errors),
its event history, and its Redis state (read with ``locate.lua``: one
command, whatever the queue's size) — plus the ``worker_runs`` rows of the
workers that touched it, and writes a one-paragraph verdict: "leased by
worker w-… whose lease expired 40 s ago; the next burst will reclaim it",
"ran twice: attempt 1 was lost when worker … stopped renewing its lease".

The verdict uses the same rules as :mod:`qkit.ops.audit`, so ``explain`` and
``audit`` never disagree about a job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any


from qkit.ops.audit import CODES, Finding, ledger_findings, place_findings
from qkit.errors import NotFound
from qkit.ledger import utcnow
from qkit.ledger.reads import runs_of_workers
from qkit.engine.lifecycle import fingerprint
from qkit.model import check_job_id, jsonable
from qkit.text import clip, duration as _dur

if TYPE_CHECKING:
    from qkit.engine.queue import Queue


@dataclass
class Explanation:
    """Everything known about one job, and the verdict.  ``to_dict()`` is JSON-ready."""

    job_id: int
    queue: str
    verdict: str
    status: str | None  # the ledger's status; None when the ledger has no row
    place: str | None  # where Redis holds it: ready, delayed, leased, dead ('+'-joined if several), None
    job: dict[str, Any] | None
    attempts: list[dict[str, Any]]
    events: list[dict[str, Any]]
    redis: dict[str, Any]
    workers: dict[str, dict[str, Any]]  # worker id -> its worker_runs row
    findings: list[Finding] = field(default_factory=list)
    at: datetime = field(default_factory=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "job_id": self.job_id, "queue": self.queue, "at": self.at, "status": self.status, "place": self.place,
            "verdict": self.verdict, "findings": [f.to_dict() for f in self.findings], "job": self.job,
            "attempts": self.attempts, "events": self.events, "redis": self.redis, "workers": self.workers})

    def __str__(self) -> str:
        return render(self)


# ---------------------------------------------------------------- gathering
def locate(q: "Queue", job_id: int) -> dict[str, Any]:
    """Where Redis holds one job, from ``locate.lua`` (one command)."""
    reply = q.backend.run("locate", q.dispatch.keys, [int(job_id)])
    now_ms, ready_score, ready_rank, ready_count, due, prio, deadline, owner, dead = (list(reply) + [None] * 9)[:9]
    now_ms = int(now_ms)

    def ms(value: Any) -> int | None:
        return None if value is None else int(float(value))

    out: dict[str, Any] = {"now_ms": now_ms, "now": _from_ms(now_ms), "ready": None, "delayed": None,
                           "leased": None, "dead": None}
    if ready_score is not None:
        out["ready"] = {"score": str(ready_score), "rank": int(ready_rank) if ready_rank is not None else None,
                        "count": int(ready_count)}
    if due is not None:
        out["delayed"] = {"due_ms": ms(due), "due": _from_ms(ms(due)),
                          "priority": int(prio) if prio is not None else None}
    if deadline is not None:
        d = ms(deadline)
        out["leased"] = {"owner": owner or "", "deadline_ms": d, "deadline": _from_ms(d), "valid": d > now_ms,
                         "seconds_left": round((d - now_ms) / 1000, 3)}
    if dead is not None:
        out["dead"] = {"since": _from_ms(ms(dead))}
    out["places"] = [p for p in ("ready", "delayed", "leased", "dead") if out[p] is not None]
    return out


def _from_ms(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, tz=timezone.utc)


def _detail(event: dict[str, Any]) -> dict[str, Any]:
    d = event.get("detail")
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except ValueError:
            return {}
    return d if isinstance(d, dict) else {}


def _worker_rows(q: "Queue", names: set[str]) -> dict[str, dict[str, Any]]:
    if not names:
        return {}
    return {r["worker"]: r for r in runs_of_workers(q.ledger, names)}


def explain(q: "Queue", job_id: int) -> Explanation:
    """Where job ``job_id`` of this queue is and why; raises NotFound when neither side knows it."""
    job_id = check_job_id(job_id)
    try:
        job = q.ledger.get(job_id, q.name)
    except NotFound:
        job = None
    redis = locate(q, job_id)
    if job is None and not redis["places"]:
        try:
            other = q.ledger.get(job_id)
        except NotFound:
            raise NotFound(f"no job {job_id} in queue {q.name!r}: neither the ledger nor Redis knows it") from None
        raise NotFound(f"job {job_id} is in queue {other.queue!r}, not {q.name!r} (use --queue {other.queue})")
    attempts = q.ledger.attempts(job_id) if job else []
    events = q.ledger.events(job_id) if job else []
    names = {a["worker"] for a in attempts} | {e["worker"] for e in events if e.get("worker")}
    if redis["leased"] and redis["leased"]["owner"]:
        names.add(redis["leased"]["owner"])
    workers = _worker_rows(q, names)
    places = {"ready": redis["ready"] is not None, "delayed": redis["delayed"]["due_ms"] if redis["delayed"] else None,
              "leased": (redis["leased"]["deadline_ms"], redis["leased"]["owner"]) if redis["leased"] else None,
              "dead": redis["dead"] is not None}
    findings = place_findings(job_id, job.status if job else None, places, redis["now_ms"])
    if job is not None:
        findings += ledger_findings(q, [job_id])
    exp = Explanation(job_id=job_id, queue=q.name, verdict="", status=job.status if job else None,
                      place="+".join(redis["places"]) or None,
                      job={k: getattr(job, k) for k in job.__dataclass_fields__} if job else None,
                      attempts=attempts, events=events, redis=redis, workers=workers, findings=findings)
    exp.verdict = _verdict(q, exp)
    return exp


# ---------------------------------------------------------------- words
def _at(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "?"


def _short(error: str | None, limit: int = 160) -> str:
    if not error:
        return "no error recorded"
    return clip(error.strip().splitlines()[0], limit + 1)  # at most ``limit`` characters and the ellipsis


def _run_note(exp: Explanation, worker: str, event_at: datetime | None = None) -> str:
    """What the worker's run row says about how it ended (died, stalled, or still running)."""
    run = exp.workers.get(worker)
    if run is None:
        return ""
    if run.get("finished_at") is None:
        return f"its run (started {_at(run['started_at'])}) never closed: the process died, or is still stalled"
    if run.get("status") == "abandoned":  # closed by a later burst or audit --repair: its process was gone
        return (f"its run (started {_at(run['started_at'])}) never closed: the process died "
                f"(found gone and marked abandoned at {_at(run['finished_at'])})")
    if event_at is not None and run["finished_at"] > event_at:
        return (f"{worker} was stalled, not dead: its run ended later, at {_at(run['finished_at'])} "
                f"(status {run['status']}), so its handler may have finished too, but that late outcome was "
                "refused (fenced)")
    return f"its run ended at {_at(run['finished_at'])} (status {run['status']})"


def asked(retry_after_ms: float | None, delay_s: float | None = None) -> str:
    """How a handler-named retry delay reads: "the handler asked to retry after 2 s" (and its cap)."""
    if retry_after_ms is None:
        return ""
    want = retry_after_ms / 1000
    capped = delay_s is not None and delay_s < want - 1e-3
    return f"the handler asked to retry after {want:g} s" + (f" (capped at {delay_s:g} s)" if capped else "")


def _history(exp: Explanation) -> list[str]:
    """Sentences about earlier attempts and replays: why it ran more than once."""
    job = exp.job or {}
    epoch = job.get("epoch", 0)
    current = [a for a in exp.attempts if a["epoch"] == epoch]
    older = [a for a in exp.attempts if a["epoch"] != epoch]
    out: list[str] = []
    ran = len(exp.attempts)
    if ran > 1:
        words = {2: "twice", 3: "three times"}.get(ran, f"{ran} times")
        out.append(f"Its handler was started {words}" + (f" over {epoch + 1} replay epochs" if epoch else "") + ".")
    reclaims = [e for e in exp.events if e["event"] == "reclaimed"]
    renewals = {(_detail(e).get("attempt"), e.get("worker")): e["at"] for e in exp.events
                if e["event"] == "lease_renewed"}
    for a in current:
        if a["outcome"] == "lost":
            later = [x for x in current if x["attempt"] == a["attempt"] + 1]
            by = next((e.get("worker") for e in reclaims
                       if _detail(e).get("lost_attempt") == a["attempt"] and e["at"] >= a["started_at"]),
                      later[0]["worker"] if later else None)
            renewed = renewals.get((a["attempt"], a["worker"]))
            note = _run_note(exp, a["worker"], a["finished_at"])
            out.append(f"Attempt {a['attempt']} was lost when worker {a['worker']} stopped renewing its lease "
                       f"(claimed at {_at(a['started_at'])}"
                       + (f", lease renewed at {_at(renewed)}" if renewed else "")
                       + f"; reclaimed{' by ' + by if by else ''} at {_at(a['finished_at'])})"
                       + (f": {note}" if note else "") + ".")
        elif a["outcome"] in ("failed", "timeout") and a["attempt"] < job.get("attempts", 0):
            delay = next((_detail(e).get("delay_s") for e in exp.events if e["event"] == "retry_scheduled"
                          and _detail(e).get("attempt") == a["attempt"] and e["at"] >= a["started_at"]), None)
            named = asked(a.get("retry_after_ms"), delay)
            out.append(f"Attempt {a['attempt']} {'timed out' if a['outcome'] == 'timeout' else 'failed'} on "
                       f"{a['worker']} ({_short(a['error'], 100)})"
                       + (f" and {named}" if named else "" if delay is None else " and was retried at once"
                          if not delay else f" and was retried after a {delay:g} s back-off") + ".")
    if older:
        epochs = sorted({a["epoch"] for a in older})
        out.append(f"Before that it was replayed from the DLQ {epoch} time(s); earlier epoch(s) "
                   f"{', '.join(map(str, epochs))} ran {len(older)} attempt(s) that all ended in failure.")
    if current and all(a["outcome"] == "lost" for a in current) and len(current) > 1:
        out.append("Every attempt lost its worker: the job probably kills (or hangs) the process that runs it.")
    return out


def _verdict(q: "Queue", exp: Explanation) -> str:
    r = exp.redis
    now = r["now"]
    job = exp.job
    jid = exp.job_id
    lease = r["leased"]
    if job is None:
        where = " and ".join(r["places"])
        return (f"Job {jid} has no ledger row in queue {q.name!r}, yet Redis holds it ({where}). It will never run: "
                "a claim finds no row and drops it. `qkit audit --repair` removes the entry.")
    status = job["status"]
    n, mx = job["attempts"], job["max_attempts"]
    open_attempt = next((a for a in reversed(exp.attempts) if a["outcome"] is None), None)
    parts: list[str] = []
    if len(r["places"]) > 1:
        parts.append(f"Job {jid} is {status} in the ledger but Redis holds it in {' and '.join(r['places'])} at once "
                     "(drift): `qkit audit --repair` drops the copies and pushes it again from the ledger.")
    elif status == "pending":
        last_retry = next((e for e in reversed(exp.events) if e["event"] == "retry_scheduled"), None)
        if r["ready"]:
            rank, count = r["ready"]["rank"], r["ready"]["count"]
            since = job["run_at"] or job["created_at"]
            ahead = "first in line" if not rank else f"{rank} job(s) ahead of it in the ready set"
            parts.append(f"Job {jid} is pending and ready to run ({ahead}; {count} ready in all), due since "
                         f"{_at(since)} ({_dur((now - since).total_seconds())} ago). The next burst claims it"
                         + (" first." if not rank else " after those ahead of it."))
            from qkit.ops.limits import current_limits

            limit = current_limits(q).get(job["type"])
            if limit is not None:  # docs/semantics.md#limits-per-type
                parts.append(f"Its type {job['type']} has a limit ({limit.describe()}): a claim passes it over, "
                             "without an attempt, while the type is at that limit.")
        elif r["delayed"]:
            due = r["delayed"]["due"]
            retry = _detail(last_retry) if last_retry else {}
            named = asked(None if retry.get("retry_after_s") is None else retry["retry_after_s"] * 1000,
                          retry.get("delay_s"))
            why = (f"the delay asked for after attempt {n}: {named} ({_short(job['error'], 100)})" if n and named
                   else f"the retry back-off after attempt {n} ({_short(job['error'], 100)})" if n and last_retry
                   else "the delay it was enqueued with")
            if due > now:
                parts.append(f"Job {jid} is pending, delayed until {_at(due)} (in {_dur((due - now).total_seconds())})"
                             f" by {why}. No burst claims it before then.")
            else:
                parts.append(f"Job {jid} is pending and due since {_at(due)} ({_dur((now - due).total_seconds())} "
                             f"ago; it was delayed by {why}). The next burst claims it.")
        elif lease:
            if lease["valid"]:
                parts.append(f"Job {jid} is pending in the ledger but leased in Redis to worker {lease['owner']} "
                             f"until {_at(lease['deadline'])}: that worker has just claimed it and is recording the "
                             f"claim. If it crashed instead, the lease runs out in {_dur(lease['seconds_left'])} and "
                             "the next burst claims the job again.")
            else:
                parts.append(f"Job {jid} is pending in the ledger but leased in Redis to worker {lease['owner']} whose "
                             f"lease expired {_dur(-lease['seconds_left'])} ago: that worker died between its Redis "
                             "claim and its ledger write. The next burst will reclaim it and run it (no attempt was "
                             "recorded, so none is lost).")
        elif r["dead"]:
            parts.append(f"Job {jid} is pending in the ledger but sits in the Redis DLQ (drift, e.g. a replay whose "
                         "Redis write was lost): it cannot run until `qkit audit --repair` (or the next burst's "
                         "drift check) pushes it back to ready.")
        else:
            parts.append(f"Job {jid} is pending in the ledger but missing from Redis (a push was lost, or Redis lost "
                         "its data), so no worker can claim it. The next burst's drift check or `qkit audit --repair` "
                         "pushes it again" + (f", delayed until {_at(job['run_at'])}." if job["run_at"] and
                                               job["run_at"] > now else "."))
    elif status == "processing":
        asked_at = next((e["at"] for e in reversed(exp.events) if e["event"] == "cancel_requested"), None)
        if asked_at is not None:
            parts.append(f"Its cancel was requested at {_at(asked_at)}: its handler sees "
                         "current_job().cancel_requested at its worker's next lease renewal, and the job ends "
                         "cancelled when this attempt ends, however it ends.")
        a_no = open_attempt["attempt"] if open_attempt else n
        holder = open_attempt["worker"] if open_attempt else "?"
        left = mx - a_no
        after = (f"{left} attempt(s) left after that" if left > 0
                 else "that was its last attempt, so it then goes to the DLQ")
        if lease and lease["valid"]:
            other = lease["owner"] != holder
            parts.append(f"Job {jid} is running: attempt {a_no}/{mx} was claimed by worker {holder} at "
                         f"{_at(open_attempt['started_at'] if open_attempt else None)}"
                         + (f"; Redis shows the lease now held by {lease['owner']}" if other else "")
                         + f", and the lease is valid for another {_dur(lease['seconds_left'])} (the worker renews "
                         "it while the handler runs).")
        elif lease:
            note = _run_note(exp, lease["owner"] or holder)
            parts.append(f"Job {jid} is leased by worker {lease['owner'] or holder} whose lease expired "
                         f"{_dur(-lease['seconds_left'])} ago" + (f"; {note}" if note else "")
                         + f". The next burst will reclaim it and record attempt {a_no} as lost ({after}).")
        elif r["ready"] or r["delayed"]:
            parts.append(f"Job {jid} is processing in the ledger (attempt {a_no} by {holder}) and back in ready "
                         "after a repair: the next claim records attempt "
                         f"{a_no} as lost and runs it again ({after}).")
        else:
            parts.append(f"Job {jid} is processing in the ledger (attempt {a_no}/{mx} by {holder}, started "
                         f"{_at(open_attempt['started_at'] if open_attempt else None)}) but Redis holds no lease for "
                         "it (Redis lost it). `qkit audit --repair` or the next burst pushes it back; its claim then "
                         f"records attempt {a_no} as lost ({after}).")
    elif status == "completed":
        done = next((a for a in reversed(exp.attempts) if a["outcome"] == "completed"), None)
        wait = ((job["started_at"] - job["created_at"]).total_seconds()
                if job.get("started_at") and job.get("created_at") else None)
        parts.append(f"Job {jid} completed on attempt {n}/{mx}"
                     + (f" by worker {done['worker']} at {_at(done['finished_at'])} after "
                        f"{_dur((done['duration_ms'] or 0) / 1000)}" if done else "")
                     + (f"; it waited {_dur(wait)} for its first claim" if wait is not None else "") + ".")
        if lease and lease["valid"]:
            parts.append(f"Its worker {lease['owner']} still holds the lease and releases it in its next call.")
        elif r["places"]:
            parts.append(f"Redis still holds a stale entry for it ({'+'.join(r['places'])}): a claim drops it "
                         "without running it, and `qkit audit --repair` removes it.")
    elif status == "failed":
        final = next((a for a in reversed(exp.attempts) if a["epoch"] == job.get("epoch", 0)), None)
        fp = (final or {}).get("fingerprint") or fingerprint(job["error"])
        dead_reason = next((_detail(e).get("reason") for e in reversed(exp.events) if e["event"] == "failed"), None)
        permanent = dead_reason == "permanent" or bool(job["error"] and job["error"].startswith("UnknownJobType"))
        from qkit.ops.handled import has_handler
        from qkit.ops.triage import fingerprint_id

        # never advise a replay that can only fail the same way: no worker knows the type
        replay = (f" Replay it with `qkit dlq replay {jid}`"
                  + (f" (or the whole group: `qkit dlq replay --fingerprint {fingerprint_id(fp)}`)." if fp else ".")
                  if has_handler(q, job["type"]) else
                  f" No worker has a handler for type {job['type']!r}: register one (`@qkit.handler` in a module "
                  "QKIT_HANDLERS names, for the workers) before replaying it; a replay now fails the same way.")
        parts.append(f"Job {jid} failed and is in the DLQ: attempt {n}/{mx} "
                     + (f"({final['outcome']}) " if final else "")
                     + f"ended it at {_at(job['finished_at'])} with: {_short(job['error'])}."
                     + ((" No handler is registered for its type, so it was not retried."
                         if job["error"].startswith("UnknownJobType") else
                         f" It was not retried: permanent error: {_short(job['error'], 100)}.")
                        if permanent else "")
                     + (f" Error fingerprint {fingerprint_id(fp)} ({fp})." if fp else "") + replay)
        if lease and lease["valid"]:
            parts.append(f"Its worker {lease['owner']} still holds the lease and moves it to the DLQ in its next call.")
        elif not r["dead"]:
            parts.append("But Redis has no DLQ entry for it (drift): `qkit audit --repair` dead-letters it.")
    elif status == "cancelled":
        last = exp.attempts[-1] if exp.attempts else None
        parts.append(f"Job {jid} was cancelled at {_at(job['finished_at'])} "
                     + (f"while attempt {last['attempt']} ran (that attempt ended {last['outcome']}); "
                        if last and any(e["event"] == "cancel_requested" for e in exp.events)
                        else "before it ran again; " if n else "before it ever ran; ")
                     + "it will not run again. Cancelled is final, not a failure: it is not in the DLQ.")
        if lease and lease["valid"]:
            parts.append(f"Its worker {lease['owner']} still holds the lease and releases it in its next call.")
        elif r["places"]:
            parts.append(f"Redis still holds a stale entry for it ({'+'.join(r['places'])}): a claim drops it "
                         "without running it, and `qkit audit --repair` removes it.")
    else:
        parts.append(f"Job {jid} has status {status!r}, which is not one of qkit's five statuses (ledger damage).")
    parts += _history(exp)
    errors = [f for f in exp.findings if f.severity == "error" and not f.code.startswith(("pending_", "processing_"))
              and f.code not in ("failed_not_in_dlq", "terminal_entry", "orphan_entry", "duplicate_entry")]
    if errors:
        parts.append("Audit: " + "; ".join(f"{f.code} ({f.message})" for f in errors) + ".")
    return " ".join(parts)


def render(exp: Explanation) -> str:
    """The human form of ``qkit explain``: the verdict, then the records it rests on."""
    lines = [exp.verdict, ""]
    job = exp.job
    if job:
        lines.append(f"job {job['id']} [{job['queue']}] {job['type']}: {job['status']} (attempts {job['attempts']}/"
                     f"{job['max_attempts']}, priority {job['priority']}, epoch {job.get('epoch', 0)}), created "
                     f"{_at(job['created_at'])}")
    r = exp.redis
    where = []
    if r["ready"]:
        where.append(f"ready (rank {r['ready']['rank']} of {r['ready']['count']}, score {r['ready']['score']})")
    if r["delayed"]:
        where.append(f"delayed until {_at(r['delayed']['due'])}")
    if r["leased"]:
        lease = r["leased"]
        where.append(f"leased by {lease['owner']} until {_at(lease['deadline'])} "
                     + ("(valid)" if lease["valid"] else f"(expired {_dur(-lease['seconds_left'])} ago)"))
    if r["dead"]:
        where.append(f"in the DLQ since {_at(r['dead']['since'])}")
    lines.append(f"redis: {'; '.join(where) or 'nowhere'} (Redis time {_at(r['now'])})")
    if exp.attempts:
        lines.append("attempts:")
        for a in exp.attempts:
            lines.append(f"  epoch {a['epoch']} attempt {a['attempt']} by {a['worker']}: {a['outcome'] or 'running'}"
                         f" started {_at(a['started_at'])}"
                         + (f", {a['duration_ms']:.0f} ms" if a.get("duration_ms") is not None else "")
                         + (f" - {_short(a['error'], 120)}" if a.get("error") else "")
                         + (f" ({asked(a['retry_after_ms'])})" if a.get("retry_after_ms") is not None else ""))
    if exp.events:
        lines.append("events:")
        for e in exp.events:
            d = _detail(e)
            lines.append(f"  {_at(e['at'])}  {e['event']:<16} {e.get('worker') or '':<36} "
                         + (json.dumps(d, separators=(',', ':')) if d else ""))
    if exp.findings:
        lines.append("findings: " + "; ".join(f"{f.severity} {f.code}" for f in exp.findings))
    return "\n".join(lines)


__all__ = ["Explanation", "explain", "locate", "render", "CODES"]

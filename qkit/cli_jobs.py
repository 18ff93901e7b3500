"""The CLI's views for people: ``qkit jobs``, ``qkit queues``, ``qkit stats`` and ``qkit runs``, each a
table under a header (``--json``: one JSON document).  ``stats`` refuses to show figures when Redis does
not answer (exit 1) rather than print numbers that may be stale."""
from __future__ import annotations

from typing import Any

import click

from qkit.cli_common import _open, emit, first_line, json_option, queue_option, seconds, table, when
from qkit.errors import BackendUnavailable
from qkit.model import STATUSES, check_name


@click.command("jobs")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only jobs with this status.")
@click.option("--type", "type_", metavar="TYPE", default=None, help="Only jobs of this type.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="At most N, newest first.")
@queue_option
@json_option
def jobs_command(status: str | None, type_: str | None, limit: int, queue: str, as_json: bool) -> None:
    """Jobs of a queue, newest first (payloads and results left out: `qkit job ID` shows one in full)."""
    if type_ is not None:
        check_name(type_, "job type")
    with _open(queue) as q:
        rows = q.ledger.job_summaries(q.name, status=status, type=type_, limit=limit, error_chars=300)
    emit(rows, as_json, lambda rs: _jobs_human(rs, queue, status, type_, limit))


def _jobs_human(rows: list[dict[str, Any]], queue: str, status: str | None, type_: str | None, limit: int) -> str:
    if not rows:
        what = " ".join(x for x in (status, f"of type {type_!r}" if type_ else None) if x)
        return f"no {what + ' ' if what else ''}jobs in queue {queue!r}"
    body = table([(r["id"], r["type"], r["status"], r["priority"], f"{r['attempts']}/{r['max_attempts']}",
                   when(r["created_at"]), _job_when(r), first_line(r.get("error"))) for r in rows],
                 ["ID", "TYPE", "STATUS", "PRIORITY", "ATTEMPTS", "CREATED (UTC)", "DUE / FINISHED (UTC)", "ERROR"],
                 right=(0, 3, 4))
    return body + (f"\n(the newest {limit}; --limit N shows more)" if len(rows) == limit else "")


def _job_when(r: dict[str, Any]) -> str:
    """When a pending job is due, or when a terminal one finished."""
    if r["status"] == "pending":
        return f"due {when(r['run_at'])}"
    return when(r["finished_at"]) if r.get("finished_at") else "-"


# ---------------------------------------------------------------- queues
@click.command("queues")
@json_option
def queues_command(as_json: bool) -> None:
    """Every queue of the ledger: jobs per status, depth (due now), delayed, the oldest due job's wait."""
    from qkit.config import DEFAULT_QUEUE
    from qkit.ops.queues import queue_rows

    with _open(DEFAULT_QUEUE) as q:
        rows = [r for r in queue_rows(q.ledger, DEFAULT_QUEUE) if r["total"] or r["queue"] != DEFAULT_QUEUE]
    emit(rows, as_json, _queues_human)


def _queues_human(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no queues yet (the ledger holds no job)"
    statuses = [s for s in STATUSES if any(r["counts"].get(s) for r in rows) or s != "cancelled"]
    return table([(r["queue"], r["depth"], r["delayed"], *(f"{r['counts'].get(s, 0):,}" for s in statuses[1:]),
                   f"{r['total']:,}", seconds(r["oldest_due_age_s"]), "paused" if r["paused"] else "")
                  for r in rows],
                 ["QUEUE", "DUE", "DELAYED", *(s.upper() for s in statuses[1:]), "TOTAL", "OLDEST DUE WAITS", ""],
                 right=tuple(range(1, len(statuses) + 4)))


# ---------------------------------------------------------------- stats
@click.command("stats")
@queue_option
@json_option
def stats_command(queue: str, as_json: bool) -> None:
    """Counts per status, success rate and execution time of a queue."""
    with _open(queue) as q:
        try:
            q.backend.ping()  # the ledger answered when the queue opened
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"warning: no stats: {exc}") from None
        data = q.stats()
    emit(data, as_json, _stats_human)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "     -"


def _stats_human(d: dict[str, Any]) -> str:
    """The queue's figures for people: counts with their share, rates as percentages, times with units."""
    statuses = [s for s in STATUSES if s in d]
    total = d.get("total") or sum(d[s] for s in statuses)
    lines = [f"queue {d['queue']!r} ({d.get('backend', '?')} backend)", ""]
    rows = []
    for s in statuses:
        note = f"due {d['due']}, delayed {d['delayed']}" if s == "pending" and "due" in d else ""
        rows.append((s, f"{d[s]:,}", _pct(d[s], total), note))
    rows.append(("total", f"{total:,}", "", ""))
    lines.append(table(rows, ["STATUS", "JOBS", "SHARE", ""], right=(1, 2), width=1 << 30))
    rate = d.get("success_rate")
    lines += ["", f"success rate   {'-' if rate is None else f'{100 * rate:.1f}%'}"
                  + ("  (completed of completed + failed)" if rate is not None else "  (no finished jobs yet)"),
              f"avg exec time  {seconds(d['avg_exec_ms'] / 1000) if d.get('avg_exec_ms') is not None else '-'}"
              "  (completed attempts)"]
    attempts = d.get("attempts") or {}
    if attempts:
        n = sum(attempts.values())
        lines.append("attempts       " + ", ".join(f"{k} {v:,} ({_pct(v, n).strip()})"
                                                  for k, v in sorted(attempts.items(), key=lambda kv: -kv[1])))
    cost = d.get("cost") or {}
    if cost:
        per_job = cost.get("commands_per_job")
        usd = cost.get("upstash_usd_per_100k_jobs")
        lines += ["", f"cost (this process)  {cost.get('redis_commands', 0):,} Redis commands, "
                      f"{cost.get('http_requests', 0):,} HTTP requests, {cost.get('ledger_statements', 0):,} ledger "
                      f"statements; {cost.get('jobs_finished_here', 0):,} jobs finished here",
                  f"per finished job     {'-' if per_job is None else f'{per_job:g} Redis commands'}; "
                  f"on Upstash {'-' if usd is None else f'${usd:,.4f}'} per 100k jobs"]
    starving = (d.get("starvation") or {}).get("by_priority") or []
    if starving:
        lines += ["", "wait for the first claim, per priority (the most recent claimed jobs):",
                  table([(r["priority"], r["claimed"], seconds(r["wait_p50_s"]), seconds(r["wait_p95_s"]),
                          r["waiting"], seconds(r["oldest_waiting_s"])) for r in starving],
                        ["PRIORITY", "CLAIMED", "P50", "P95", "WAITING NOW", "OLDEST WAITING"],
                        right=(0, 1, 2, 3, 4, 5), width=1 << 30)]
    return "\n".join(lines)


# ---------------------------------------------------------------- runs
@click.command("runs")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="At most N, newest first.")
@queue_option
@json_option
def runs_command(limit: int, queue: str, as_json: bool) -> None:
    """The worker run history (scheduled, CLI, HTTP and notebook bursts), newest first."""
    from qkit.ledger.reads import queue_runs

    with _open(queue) as q:
        rows = queue_runs(q.ledger, queue, limit)
    emit(rows, as_json, lambda rs: _runs_human(rs, queue))


def _runs_human(rows: list[dict[str, Any]], queue: str) -> str:
    if not rows:
        return f"no runs yet in queue {queue!r}"
    out = []
    for r in rows:
        took = ((r["finished_at"] - r["started_at"]).total_seconds()
                if r.get("finished_at") and r.get("started_at") else None)
        out.append((r["id"], when(r["started_at"]), seconds(took) if took is not None else "running",
                    r["status"], r["processed"], r["completed"], r["retried"], r["failed"], r.get("released") or 0,
                    r["trigger"], _runner(r)))
    return table(out, ["RUN", "STARTED (UTC)", "DURATION", "STATUS", "PROCESSED", "COMPLETED", "RETRIED", "FAILED",
                       "RELEASED", "TRIGGER", "NOTEBOOK / ERROR"], right=(0, 2, 4, 5, 6, 7, 8))


def _runner(r: dict[str, Any]) -> str:
    """A scheduled run's verdict and executed notebook (qkit.runs.runner), or a failed burst's error."""
    params = r.get("params") if isinstance(r.get("params"), dict) else {}
    runner = params.get("runner") if isinstance(params.get("runner"), dict) else None
    if runner:
        return f"{runner.get('status')} (exit {runner.get('exit_code')}) -> {runner.get('output')}"
    return first_line(r.get("error"))


COMMANDS = [jobs_command, queues_command, stats_command, runs_command]

"""``qkit dlq``: list the dead-letter queue (grouped by error fingerprint), replay and purge it
(docs/semantics.md#dead-letter-queue).  A purge asks first on a terminal and refuses off one without --yes."""
from __future__ import annotations

import sys
from typing import Any

import click

from qkit.cli_common import JOB_ID, _open, emit, first_line, job_queue_option, json_option, queue_option, table, when
from qkit.config import DEFAULT_QUEUE
from qkit.errors import BadInput


@click.group()
def dlq() -> None:
    """The dead-letter queue: list, replay, purge."""


@dlq.command("list")
@click.option("--group", is_flag=True, help="Group by error fingerprint and type (counts, first/last failure).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="At most N jobs, newest failure first (not with --group).")
@queue_option
@json_option
def dlq_list(group: bool, limit: int, queue: str, as_json: bool) -> None:
    """Failed jobs with their final error (or, with --group, grouped by error fingerprint)."""
    from qkit.ops.triage import dead_rows, group_rows

    with _open(queue) as q:
        if group:
            groups = group_rows(q)
            emit(groups, as_json, lambda rs: _groups_human(rs, queue))
            return
        rows = dead_rows(q, limit)
    emit(rows, as_json, lambda rs: _rows_human(rs, queue, limit))


def _rows_human(rows: list[dict[str, Any]], queue: str, limit: int) -> str:
    if not rows:
        return f"the DLQ of queue {queue!r} is empty"
    body = table([(r["id"], r["type"], r["attempts"], when(r["finished_at"]), r["fingerprint_id"],
                   first_line(r["error"])) for r in rows],
                 ["ID", "TYPE", "ATTEMPTS", "FAILED AT (UTC)", "FINGERPRINT", "ERROR"], right=(0, 2))
    more = f"\n(the newest {limit}; --limit N shows more)" if len(rows) == limit else ""
    return body + more


def _groups_human(groups: list[dict[str, Any]], queue: str) -> str:
    if not groups:
        return f"the DLQ of queue {queue!r} is empty"
    return table([(g["fingerprint_id"], g["jobs"], g["type"], when(g["first_seen"]), when(g["last_seen"]),
                   g["fingerprint"]) for g in groups],
                 ["FINGERPRINT", "JOBS", "TYPE", "FIRST FAILED (UTC)", "LAST FAILED (UTC)", "ERROR (TYPE AT FRAME)"],
                 right=(1,))


@dlq.command("replay")
@click.argument("job_ids", nargs=-1, type=JOB_ID)
@click.option("--all", "replay_all", is_flag=True, help="Replay every job in the DLQ.")
@click.option("--fingerprint", "fingerprint", default=None, metavar="FP",
              help="Replay every DLQ job of one error fingerprint (its id from `dlq list --group`, or the text).")
@job_queue_option
@json_option
def dlq_replay(job_ids: tuple[int, ...], replay_all: bool, fingerprint: str | None, queue: str | None,
               as_json: bool) -> None:
    """Put failed jobs back to pending with a fresh attempt budget (ids: in whatever queue holds them)."""
    if sum((bool(job_ids), replay_all, fingerprint is not None)) != 1:
        raise click.UsageError("give job ids or --all or --fingerprint FP (exactly one of them)")
    if job_ids:
        ids: list[int] = []
        for home, members in _by_queue(job_ids, queue).items():
            with _open(home) as q:
                ids += q.replay(members)
    else:
        with _open(queue) as q:
            ids = q.replay_fingerprint(fingerprint) if fingerprint is not None else q.replay_all()
    emit({"replayed": ids}, as_json, lambda d: f"replayed {len(d['replayed'])} job(s)")


def _by_queue(job_ids: tuple[int, ...], queue: str | None) -> dict[str, list[int]]:
    """The ids grouped by the queue holding each (all in ``queue`` when given)."""
    if queue is not None:
        return {queue: list(job_ids)}
    out: dict[str, list[int]] = {}
    with _open(None) as q:
        for job_id in dict.fromkeys(job_ids):
            out.setdefault(q.ledger.get(job_id).queue, []).append(job_id)
    return out


@dlq.command("purge")
@click.option("--dry-run", is_flag=True, help="Only count what would be purged; nothing changes.")
@click.option("--yes", "-y", "yes", is_flag=True, help="Do not ask (required when not on a terminal).")
@click.option("--fingerprint", default=None, metavar="FP",
              help="Only jobs of this error fingerprint (its id from `dlq list --group`, or the text).")
@click.option("--older-than", "older_than", default=None, metavar="AGE",
              help="Only jobs that failed more than AGE ago (90s, 30m, 12h, 7d, 2w).")
@queue_option
@json_option
def dlq_purge(dry_run: bool, yes: bool, fingerprint: str | None, older_than: str | None, queue: str,
              as_json: bool) -> None:
    """Delete jobs of the DLQ with their attempts and events (all of them, or those the filters pick)."""
    from qkit.ops.retention import parse_age
    from qkit.ops.triage import check_fingerprint, purge_selection

    age = parse_age(older_than) if older_than is not None else None  # bad input before anything is opened
    fingerprint = check_fingerprint(fingerprint) if fingerprint is not None else None
    if not (dry_run or yes or sys.stdin.isatty()):
        raise BadInput("dlq purge deletes jobs and their history: pass --yes to confirm (or --dry-run to count); "
                       "it asks on a terminal")
    what = _describe(queue, fingerprint, older_than)
    with _open(queue) as q:
        chosen = purge_selection(q, fingerprint=fingerprint, older_than=age)
        if dry_run or not chosen:
            emit({"dry_run": dry_run, "would_purge" if dry_run else "purged": len(chosen)}, as_json,
                 lambda d: f"{'would purge' if dry_run else 'purged'} {len(chosen)} job(s) of {what}")
            return
        if not yes and not click.confirm(f"purge {len(chosen)} job(s) of {what}, with their history?", err=True):
            emit({"dry_run": False, "purged": 0}, as_json, lambda d: "nothing purged")
            return
        n = q.purge_dead(chosen)
    emit({"dry_run": False, "purged": n}, as_json, lambda d: f"purged {n} job(s) of {what}"
         + (f" ({len(chosen) - n} changed meanwhile and were left)" if n < len(chosen) else ""))


def _describe(queue: str, fingerprint: str | None, older_than: str | None) -> str:
    parts = [f"the DLQ of queue {queue!r}" if queue != DEFAULT_QUEUE else "the DLQ"]
    if fingerprint is not None:
        parts.append(f"with fingerprint {fingerprint}")
    if older_than is not None:
        parts.append(f"that failed more than {older_than} ago")
    return " ".join(parts)


"""``qkit schedule add|list|rm`` and ``qkit tick``: recurring schedules from the command line.

Registered on the ``qkit`` group by :mod:`qkit.cli` (docs/semantics.md#schedules).
Exit status as for every command: 2 for a bad cron expression, time zone,
``--catch-up`` or payload (one line), 1 for a runtime failure.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import click

from qkit.cli import _open, _parse_payload, cli, emit, json_option, queue_option
from qkit.engine.cron import SCAN_LIMIT
from qkit.errors import NotFound


def when(t: datetime | None, tz: str = "UTC") -> str:
    """``2026-12-01 09:00:00 UTC`` and, for another zone, the local time too: ``(10:00 CET)``."""
    if t is None:
        return "-"
    text = f"{t.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    if tz != "UTC":
        local = t.astimezone(ZoneInfo(tz))
        text += f" ({local:%Y-%m-%d %H:%M:%S %Z})"
    return text


def _schedule_line(s: dict[str, Any]) -> str:
    return (f"{s['name']}\t{s['cron']!r} in {s['tz']}\t{s['type']}\tcatch-up {s['catch_up']}"
            f"\tnext {when(s['next_fire_at'], s['tz'])}\tlast {when(s['last_fire_at'], s['tz'])}"
            + (f" (job {s['last_job_id']})" if s["last_job_id"] is not None else ""))


@cli.group()
def schedule() -> None:
    """Recurring jobs: one job per fire time of a cron expression, enqueued by the next burst or tick."""


@schedule.command("add")
@click.argument("name")
@click.option("--cron", "cron", required=True, metavar="EXPR",
              help="Cron expression: five fields, or six with seconds last (croniter).")
@click.option("--type", "job_type", required=True, metavar="T", help="Job type of the jobs it enqueues.")
@click.option("--payload", help="JSON object, or @file.json.")
@click.option("--tz", default="UTC", show_default=True, help="IANA time zone the expression is read in.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--max-attempts", type=int, default=3, show_default=True)
@click.option("--catch-up", "catch_up", default="latest", show_default=True, metavar="latest|all|skip",
              help="Fire times missed while nothing ran: one job for the latest, one each (at most 100), or none.")
@queue_option
@json_option
def schedule_add(name: str, cron: str, job_type: str, payload: str | None, tz: str, priority: int,
                 max_attempts: int, catch_up: str, queue: str, as_json: bool) -> None:
    """Create or replace the schedule NAME; prints its next fire time."""
    body = _parse_payload(payload)
    with _open(queue) as q:
        saved = q.schedule(name, cron, job_type, body, priority=priority, max_attempts=max_attempts, tz=tz,
                           catch_up=catch_up)
    emit(saved, as_json, lambda s: f"schedule {s['name']}: {s['cron']!r} in {s['tz']} -> {s['type']}; "
                                   f"next fire {when(s['next_fire_at'], s['tz'])}")


@schedule.command("list")
@queue_option
@json_option
def schedule_list(queue: str, as_json: bool) -> None:
    """The queue's schedules, soonest next fire first (--json includes their payloads)."""
    with _open(queue) as q:
        rows = q.schedules()
    emit(rows, as_json, lambda rs: "\n".join(_schedule_line(s) for s in rs) or "no schedules")


@schedule.command("rm")
@click.argument("name")
@queue_option
@json_option
def schedule_rm(name: str, queue: str, as_json: bool) -> None:
    """Remove the schedule NAME (the jobs it enqueued stay)."""
    with _open(queue) as q:
        if not q.unschedule(name):
            raise NotFound(f"no schedule {name!r} in queue {queue!r}")
    emit({"removed": name}, as_json, lambda d: f"removed schedule {d['removed']}")


@cli.command()
@queue_option
@json_option
def tick(queue: str, as_json: bool) -> None:
    """Enqueue the jobs of the schedules whose fire time came, and nothing else."""
    with _open(queue) as q:
        fired = q.tick()
    emit(fired, as_json, lambda rows: "\n".join(_tick_line(r) for r in rows) or "no schedule due")


def _tick_line(r: dict[str, Any]) -> str:
    jobs = ", ".join(f"job {i} for {when(f)}" for i, f in zip(r["job_ids"], r["fires"])) or "no job"
    skipped = f"more than {SCAN_LIMIT}" if r["skipped"] is None else str(r["skipped"])
    return f"schedule {r['name']}: {jobs}; skipped {skipped} fire time(s); next {when(r['next_fire_at'])}"

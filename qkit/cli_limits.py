"""``qkit limit set TYPE [--rate N --per S] [--concurrency K] | list | rm TYPE`` (docs/semantics.md#limits-per-type).

A group of its own, added to the ``qkit`` group by :mod:`qkit.cli`.
Bad values are one line and exit 2 (BadInput), like every other command.
"""
from __future__ import annotations

from typing import Any

import click

from qkit.cli_common import _open as open_queue
from qkit.cli_common import emit, json_option, queue_option
from qkit.errors import BadInput


def _describe(job_type: str, value: dict[str, Any]) -> str:
    from qkit.engine.limits import check_limit

    return f"{job_type}: {check_limit(value['rate'], value['per'], value['concurrency']).describe()}"


@click.group()
def limit() -> None:
    """Limits per job type: rate (starts per window) and concurrency, across every worker."""


@limit.command("set")
@click.argument("job_type", metavar="TYPE")
@click.option("--rate", type=int, default=None, help="At most N attempts start per --per seconds.")
@click.option("--per", type=float, default=None, help="The rate's window, seconds (default 60).")
@click.option("--concurrency", type=int, default=None, help="At most K attempts run at once.")
@queue_option
@json_option
def limit_set(job_type: str, rate: int | None, per: float | None, concurrency: int | None, queue: str,
              as_json: bool) -> None:
    """Limit TYPE (replaces its previous limit)."""
    if per is not None and rate is None:
        raise BadInput("--per is the window of --rate: give --rate too")
    with open_queue(queue) as q:
        value = q.limit(job_type, rate=rate, per=60.0 if per is None else per, concurrency=concurrency)
    emit({"queue": queue, "type": job_type, **value}, as_json,
         lambda d: f"limited {_describe(job_type, value)} (queue {queue})")


@limit.command("list")
@queue_option
@json_option
def limit_list(queue: str, as_json: bool) -> None:
    """The queue's limits."""
    with open_queue(queue) as q:
        limits = q.limits()
    emit(limits, as_json, lambda d: "\n".join(_describe(t, v) for t, v in d.items())
         or f"no limits on queue {queue}")


@limit.command("rm")
@click.argument("job_type", metavar="TYPE")
@queue_option
@json_option
def limit_rm(job_type: str, queue: str, as_json: bool) -> None:
    """Lift the limit of TYPE."""
    with open_queue(queue) as q:
        removed = q.unlimit(job_type)
    emit({"queue": queue, "type": job_type, "removed": removed}, as_json,
         lambda d: f"{'lifted the limit of' if removed else 'no limit on'} {job_type} (queue {queue})")

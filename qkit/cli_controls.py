"""``qkit cancel ID``, ``qkit pause|resume [--queue Q]``, ``qkit promote ID``: an operator's interventions
(docs/semantics.md#cancel-pause-promote).  :mod:`qkit.cli` adds :data:`COMMANDS` to the ``qkit`` group; its
helpers are imported when a command runs (``python -m qkit.cli`` runs that module as ``__main__``)."""
from __future__ import annotations

from typing import Any

import click

from qkit.errors import Conflict
from qkit.model import MAX_ID

JOB_ID = click.IntRange(1, MAX_ID)
queue_option = click.option("--queue", default="default", show_default=True, help="Queue name.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
COMMANDS: list[click.Command] = []


def _open(queue: str) -> Any:
    from qkit.cli import _open as open_queue

    return open_queue(queue)


def emit(data: Any, as_json: bool, human: Any) -> None:
    from qkit.cli import emit as print_it

    print_it(data, as_json, human)


def _command(func: Any) -> click.Command:
    COMMANDS.append(func)
    return func


@_command
@click.command()
@click.argument("job_id", type=JOB_ID)
@queue_option
@json_option
def cancel(job_id: int, queue: str, as_json: bool) -> None:
    """Cancel a job: pending or delayed, it never runs; running, its handler is told and it ends cancelled."""
    with _open(queue) as q:
        was = q.get(job_id).status
        if not q.cancel(job_id):
            raise Conflict(f"job {job_id} is {q.get(job_id).status}: only a pending, delayed or running job can be "
                           "cancelled")
    if was == "processing":
        outcome = "running: cancel requested (its handler sees current_job().cancel_requested; it ends cancelled)"
    else:
        outcome = "cancelled (it will not run)"
    emit({"id": job_id, "queue": queue, "cancelled": True, "was": was}, as_json, lambda _d: f"job {job_id}: {outcome}")


def _pause_command(paused: bool) -> None:
    verb = "pause" if paused else "resume"

    @_command
    @click.command(verb)
    @queue_option
    @json_option
    def command(queue: str, as_json: bool) -> None:
        with _open(queue) as q:
            changed = q.pause() if paused else q.resume()
        state = "paused" if paused else "running"
        emit({"queue": queue, "paused": paused, "changed": changed}, as_json,
             lambda _d: f"queue {queue}: {state}" + ("" if changed else f" (it already was {state})"))

    command.help = ("Pause a queue: its bursts claim nothing (one Redis command each) until resumed."
                    if paused else "Resume a paused queue: its bursts claim again.")


_pause_command(True)
_pause_command(False)


@_command
@click.command()
@click.argument("job_id", type=JOB_ID)
@queue_option
@json_option
def promote(job_id: int, queue: str, as_json: bool) -> None:
    """Run a delayed job now: it becomes due at once."""
    with _open(queue) as q:
        if not q.promote(job_id):
            job = q.get(job_id)
            why = "already due" if job.status == "pending" else job.status
            raise Conflict(f"job {job_id} is not delayed ({why}): only a delayed job can be promoted")
    emit({"id": job_id, "queue": queue, "promoted": True}, as_json, lambda _d: f"job {job_id}: due now")

"""``qkit cancel ID``, ``qkit pause|resume [--queue Q]``, ``qkit promote ID``: an operator's interventions
(docs/semantics.md#cancel-pause-promote).  :mod:`qkit.cli` adds :data:`COMMANDS` to the ``qkit`` group; its
helpers come from :mod:`qkit.cli_common`; a job id is found in whatever queue holds it unless ``--queue`` says."""
from __future__ import annotations

from typing import Any

import click

from qkit.cli_common import JOB_ID, _open, emit, job_queue_option, json_option, open_job_queue, queue_option
from qkit.errors import Conflict

COMMANDS: list[click.Command] = []


def _command(func: Any) -> click.Command:
    COMMANDS.append(func)
    return func


@_command
@click.command()
@click.argument("job_id", type=JOB_ID)
@job_queue_option
@json_option
def cancel(job_id: int, queue: str | None, as_json: bool) -> None:
    """Cancel a job: pending or delayed, it never runs; running, its handler is told and it ends cancelled."""
    with open_job_queue(job_id, queue) as q:
        queue = q.name
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
@job_queue_option
@json_option
def promote(job_id: int, queue: str | None, as_json: bool) -> None:
    """Run a delayed job now: it becomes due at once."""
    with open_job_queue(job_id, queue) as q:
        queue = q.name
        if not q.promote(job_id):
            job = q.get(job_id)
            why = "already due" if job.status == "pending" else job.status
            raise Conflict(f"job {job_id} is not delayed ({why}): only a delayed job can be promoted")
    emit({"id": job_id, "queue": queue, "promoted": True}, as_json, lambda _d: f"job {job_id}: due now")

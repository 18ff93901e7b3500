"""The nemesis soak's job type (``bench/soak.py``), loaded by workers with ``QKIT_HANDLERS=soak_handlers``.

``soak`` sleeps a short, seeded time (so a SIGKILL lands mid-handler), fails
like the simulated handlers (docs/semantics.md#interfaces; deterministically per seed, job id and
attempt, with probability ``fail_rate``), and appends one line to the log named
in the payload, with an fsync, right before it returns successfully::

    done <job id> <attempt> <pid> <worker id> <monotonic ns>

Those lines are the handler executions that ran to their end: the
``executions`` of :func:`qkit.ops.audit.total_queue`.  A ``start`` line is written
when the handler begins.  The worker id (one per burst) lets the soak tell
which replay epoch an execution belonged to, from the ledger's attempt rows;
the monotonic time (one clock for every process of the machine, untouched by
the clock-skew fault) orders executions against admin actions.  Appends go
through one ``O_APPEND`` write each, so lines of concurrent workers never
interleave.

A payload with ``"poison": <kind>`` is a job whose *own* data is hostile
(:data:`POISON_KINDS`): its error text cannot be encoded, holds NUL or is
huge, or its result holds NUL, a lone surrogate or is over the 256 KiB cap.
Kinds that return a value the contract accepts log ``done``; kinds whose
result the contract refuses (a lone surrogate is not Unicode; the cap) log
``bad`` instead: such a job may end failed (``BadResult``) without that being
a wasted success.  Kinds that raise fail every attempt and end in the DLQ.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import qkit
from qkit.engine.backoff import unit_hash
from qkit.engine.handlers import JobContext, SimulatedFailure

TYPE = "soak"

#: a file name as ``os.listdir`` returns it for latin-1 bytes: not encodable as UTF-8
SURROGATE = b"caf\xe9.txt".decode("utf-8", "surrogateescape")

#: kind -> (what it does, whether its handler returns a value the contract accepts)
POISON_KINDS: dict[str, tuple[str, bool | None]] = {
    "surrogate-error": ("raises an error whose text holds a lone surrogate", None),
    "nul-error": ("raises an error whose text holds NUL", None),
    "big-error": ("raises an error of 1 MB of text", None),
    "nul-result": ("returns a result holding NUL", True),
    "surrogate-result": ("returns a result holding a lone surrogate", False),
    "big-result": ("returns a result over the 256 KiB cap", False),
}


class Line(NamedTuple):
    what: str  # start, done or bad
    job_id: int
    attempt: int
    pid: int
    worker: str
    mono_ns: int


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _line(what: str, ctx: JobContext) -> str:
    return f"{what} {ctx.id} {ctx.attempt} {os.getpid()} {ctx.worker} {time.monotonic_ns()}\n"


def _poison(kind: str, log: str, ctx: JobContext) -> dict:
    if kind == "surrogate-error":
        raise RuntimeError("cannot process " + SURROGATE)
    if kind == "nul-error":
        raise RuntimeError("bad byte \x00 in record")
    if kind == "big-error":
        raise RuntimeError("row rejected: " + "x" * 1_000_000)
    result = {"nul-result": {"text": "a\x00b"}, "surrogate-result": {"name": SURROGATE},
              "big-result": {"blob": "x" * 300_000}}[kind]
    _append(log, _line("done" if POISON_KINDS[kind][1] else "bad", ctx))
    return result


@qkit.handler(TYPE, timeout=30)
def soak(payload: dict) -> dict:
    ctx = qkit.current_job()
    log, seed = payload["log"], payload.get("seed", 0)
    _append(log, _line("start", ctx))
    lo, hi = payload.get("sleep_ms", (5, 40))
    time.sleep((lo + (hi - lo) * unit_hash("soak-sleep", seed, ctx.id, ctx.attempt)) / 1000)
    if payload.get("poison"):
        return _poison(payload["poison"], log, ctx)
    if payload.get("doomed"):  # DLQ material for the admin actions: fails every attempt, plainly
        raise SimulatedFailure("soak: doomed job, upstream says 410 gone")
    if unit_hash("soak", seed, ctx.id, ctx.attempt) < float(payload.get("fail_rate", 0)):
        raise SimulatedFailure(f"soak: simulated upstream error 503 on attempt {ctx.attempt}")
    _append(log, _line("done", ctx))
    return {"attempt": ctx.attempt}


def read_log(path: Path | str) -> list[Line]:
    """One :class:`Line` per line; a torn last line (writer killed mid-write) is skipped."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        parts = line.split()
        if (len(parts) == 6 and parts[0] in ("start", "done", "bad")
                and all(parts[i].isdigit() for i in (1, 2, 3, 5))):
            rows.append(Line(parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4], int(parts[5])))
    return rows

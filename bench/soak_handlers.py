"""The nemesis soak's job type (``bench/soak.py``), loaded by workers with ``QKIT_HANDLERS=soak_handlers``.

``soak`` sleeps a short, seeded time (so a SIGKILL lands mid-handler), fails
like the simulated handlers (docs/semantics.md#interfaces; deterministically per seed, job id and
attempt, with probability ``fail_rate``), and appends one line to the log named
in the payload, with an fsync, right before it returns successfully::

    done <job id> <attempt> <pid>

Those lines are the handler executions that ran to their end: the
``executions`` of :func:`qkit.audit.total_queue`.  A ``start`` line is written
when the handler begins (for diagnosis only).  Appends go through one
``O_APPEND`` write each, so lines of concurrent workers never interleave.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import qkit
from qkit.backoff import unit_hash
from qkit.handlers import SimulatedFailure

TYPE = "soak"


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@qkit.handler(TYPE, timeout=30)
def soak(payload: dict) -> dict:
    ctx = qkit.current_job()
    log, seed = payload["log"], payload.get("seed", 0)
    _append(log, f"start {ctx.id} {ctx.attempt} {os.getpid()}\n")
    lo, hi = payload.get("sleep_ms", (5, 40))
    time.sleep((lo + (hi - lo) * unit_hash("soak-sleep", seed, ctx.id, ctx.attempt)) / 1000)
    if unit_hash("soak", seed, ctx.id, ctx.attempt) < float(payload.get("fail_rate", 0)):
        raise SimulatedFailure(f"soak: simulated upstream error 503 on attempt {ctx.attempt}")
    _append(log, f"done {ctx.id} {ctx.attempt} {os.getpid()}\n")
    return {"attempt": ctx.attempt}


def read_log(path: Path | str) -> list[tuple[str, int, int, int]]:
    """(what, job id, attempt, pid) per line; a torn last line (writer killed mid-write) is skipped."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in ("start", "done") and all(x.isdigit() for x in parts[1:]):
            rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return rows

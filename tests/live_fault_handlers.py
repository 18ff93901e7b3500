"""Handlers of the live-fault tests (``tests/test_live_faults.py``), imported through QKIT_HANDLERS.

Each handler that runs to its end appends ``done <id> <attempt> <pid>`` to the
log named in the payload (the format of :mod:`job_handlers`), so
:func:`job_handlers.executions` counts executions across processes.
"""
from __future__ import annotations

import os
import time

import qkit
import job_handlers  # noqa: F401 - the crash tests' handlers too (held_job), for the same workers

#: a file name as ``os.listdir`` returns it for latin-1 bytes: one lone surrogate
LATIN1_NAME = b"caf\xe9.txt".decode("utf-8", "surrogateescape")


def _done(payload: dict) -> None:
    """The ``done`` line, without fsync: in these tests no process dies mid-write."""
    ctx = qkit.current_job()
    with open(payload["log"], "a") as fh:
        fh.write(f"done {ctx.id} {ctx.attempt} {os.getpid()}\n")


@qkit.handler("lf_ok", timeout=60)
def ok(payload: dict) -> dict:
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    _done(payload)
    return {"ok": True}


@qkit.handler("lf_poison", timeout=60)
def poison(payload: dict) -> dict:
    """Ends with data the ledger cannot store as it is; ``kind`` says which."""
    kind = payload["kind"]
    if kind == "surrogate_error":
        raise RuntimeError("cannot process " + LATIN1_NAME)
    if kind == "nul_error":
        raise RuntimeError("cannot process a\x00b")
    if kind == "huge_error":
        raise RuntimeError(("x" * 1000 + LATIN1_NAME) * 200)
    _done(payload)
    if kind == "nul_result":
        return {"text": "a\x00b", "a\x00key": 1}
    if kind == "surrogate_result":
        return {"name": LATIN1_NAME}
    raise ValueError(f"unknown kind {kind!r}")

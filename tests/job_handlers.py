"""Handlers used by the crash-safety tests, imported by workers through QKIT_HANDLERS.

Every side effect is a line appended to a log file named in the payload, so a
test can count executions across processes without any Redis or SQL call.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import qkit


def _log(payload: dict, what: str) -> None:
    ctx = qkit.current_job()
    with open(payload["log"], "a") as fh:
        fh.write(f"{what} {ctx.id} {ctx.attempt} {os.getpid()}\n")
        fh.flush()
        os.fsync(fh.fileno())


def _wait(payload: dict) -> None:
    if payload.get("wait_for"):
        deadline = time.monotonic() + float(payload.get("wait_max", 60))
        while not Path(payload["wait_for"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)


@qkit.handler("record", timeout=60)
def record(payload: dict) -> dict:
    """Logs start and done; may wait for a release file or sleep first."""
    _log(payload, "start")
    _wait(payload)
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    _log(payload, "done")
    return {"pid": os.getpid()}


@qkit.handler("poison", timeout=60)
def poison(payload: dict) -> None:
    """Kills its own worker process on every attempt."""
    _log(payload, "start")
    os.kill(os.getpid(), signal.SIGKILL)


@qkit.handler("hang", timeout=0.5)
def hang(payload: dict) -> None:
    """Never returns on its own: the worker must abandon it at its timeout."""
    _log(payload, "start")
    time.sleep(3600)


@qkit.handler("fail", timeout=60)
def fail(payload: dict) -> None:
    """Logs start, then raises (after the release file ``wait_for``, if named): every attempt fails."""
    _log(payload, "start")
    _wait(payload)
    raise RuntimeError("this job always fails")


@qkit.handler("spawn_and_hang", timeout=0.5)
def spawn_and_hang(payload: dict) -> None:
    """Starts a long-lived child process, logs its pid, then never returns."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with open(payload["children"], "a") as fh:
        fh.write(f"{child.pid}\n")
    _log(payload, "start")
    time.sleep(3600)


def executions(path: Path) -> list[tuple[int, int]]:
    """``(job_id, attempt)`` of every handler call that ran to its end: the input of ``total_queue``."""
    return [(job_id, attempt) for what, job_id, attempt, _ in read_log(path) if what == "done"]


def read_log(path: Path) -> list[tuple[str, int, int, int]]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        what, job_id, attempt, pid = line.split()
        rows.append((what, int(job_id), int(attempt), int(pid)))
    return rows

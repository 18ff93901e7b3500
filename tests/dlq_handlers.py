"""Handlers of the DLQ and CLI tests (tests/test_cli_dlq.py, tests/test_cli_jobs.py), imported through
QKIT_HANDLERS: failures whose messages differ only in numbers and id-like tokens."""
from __future__ import annotations

import uuid

import qkit


def charge(n: int) -> None:
    raise ValueError(f"order {n} for job-{n * 7} failed (trace {uuid.uuid4()}, shard x{n % 5}, 0x{n * 4099:x})")


@qkit.handler("dlq_order", timeout=30)
def dlq_order(payload: dict) -> None:
    charge(int(payload["n"]))


@qkit.handler("dlq_parse", timeout=30)
def dlq_parse(payload: dict) -> None:
    raise KeyError(f"field f{payload['n']} is missing")

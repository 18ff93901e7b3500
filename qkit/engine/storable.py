"""Outcome data made storable, one job at a time (docs/reliability.md, "One job's bad data").

A handler's error text, traceback or result may hold what the ledger cannot
store: lone surrogates (file names read with ``surrogateescape``), NUL
characters (PostgreSQL's text and JSONB refuse them), or more than the caps.
Written as they are, they would fail the whole batch's transaction, and with
it every batch-mate's outcome.  These functions return text that stores,
escaped or truncated, with a marker saying so; clean text (the usual case)
is returned unchanged after one cheap check.
"""
from __future__ import annotations

from typing import Any

from qkit.model import compact_json

#: stored error and traceback text is capped at this many UTF-8 bytes (64 KiB; docs/semantics.md#bad-input-and-caps)
MAX_ERROR_BYTES = 64 * 1024
#: a stored result's JSON text is capped at this many UTF-8 bytes (the payload cap)
MAX_RESULT_BYTES = 256 * 1024
ESCAPED = " [qkit: unstorable characters escaped]"
TRUNCATED = "…[truncated]"
_MARK_BYTES = len((ESCAPED + TRUNCATED).encode())


def _escape(value: str, pg: bool) -> str:
    """Lone surrogates as ``\\udcxx`` text, and NUL as ``\\x00`` on PostgreSQL."""
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\x00", "\\x00") if pg else value


def _needs_escape(value: str, pg: bool) -> bool:
    if pg and "\x00" in value:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def text(value: str | None, pg: bool, cap: int = MAX_ERROR_BYTES) -> str | None:
    """``value`` as the ledger can store it: escaped and flagged if it must be, cut to ``cap`` bytes."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    if value.isascii() and len(value) <= cap and not (pg and "\x00" in value):
        return value  # the usual case, checked in one pass
    escaped = _needs_escape(value, pg)
    if escaped:
        value = _escape(value, pg)
    raw = value.encode("utf-8")
    if len(raw) > cap:
        value = raw[:cap - _MARK_BYTES].decode("utf-8", "ignore") + TRUNCATED
    return value + ESCAPED if escaped else value


def _clean(value: Any, pg: bool) -> Any:
    if isinstance(value, str):
        return _escape(value, pg) if _needs_escape(value, pg) else value
    if isinstance(value, dict):
        return {_clean(k, pg): _clean(v, pg) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, pg) for v in value]
    return value


def result_json(value: Any, pg: bool) -> tuple[str | None, bool]:
    """A result's JSON text as the ledger can store it, and whether strings in it were escaped.

    Raises ValueError when even the escaped text is over :data:`MAX_RESULT_BYTES`
    (a result cannot be cut and stay JSON): the caller fails that one job.
    """
    if value is None:
        return None, False
    dumped = compact_json(value)  # (NaN was refused when the handler returned: pool.outcome_of)
    escaped = False
    if not dumped.isascii() or (pg and "\\u0000" in dumped):
        if _needs_escape(dumped, pg) or (pg and "\\u0000" in dumped):
            value, escaped = _clean(value, pg), True
            dumped = compact_json(value)
    if len(dumped) > MAX_RESULT_BYTES // 4 and len(dumped.encode("utf-8")) > MAX_RESULT_BYTES:
        raise ValueError(f"the stored result would be over {MAX_RESULT_BYTES} bytes")
    return dumped, escaped

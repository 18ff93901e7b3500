"""Times as qkit keeps them: aware datetimes in UTC (no pandas here; runtime and analysis share it)."""
from __future__ import annotations

from datetime import date, datetime, time, timezone
from typing import Any


def as_utc(value: Any) -> datetime | None:
    """``None``/``""`` -> None; a datetime, a date or ISO 8601 text -> an aware UTC datetime.

    A naive time is read as UTC.  Text as the ledger returns it from SQLite
    (``2025-01-31 12:00:00.000001``) is ISO 8601 too.  Raises ValueError for
    text that is not a date or time.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 date or time (e.g. 2025-01-31T12:00:00Z)") from None
    elif hasattr(value, "to_pydatetime"):  # a pandas Timestamp
        if value != value:  # NaT
            raise ValueError(f"{value!r} is not a date or time")
        value = value.to_pydatetime()
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime.combine(value, time())
    if not isinstance(value, datetime):
        raise ValueError(f"{value!r} is not a date or time")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

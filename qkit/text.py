"""Text for people: cut to a length (messages, logs, figure labels) and durations in words (one definition each)."""
from __future__ import annotations

from typing import Any


def clip(text: Any, limit: int, *, one_line: bool = False) -> str:
    """``str(text)`` cut to ``limit`` characters, the last one an ellipsis when cut.

    ``one_line``: every run of whitespace (newlines included) becomes one space first.
    """
    text = " ".join(str(text).split()) if one_line else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration(seconds: float) -> str:
    """A duration (its absolute value) in words: '0.034 ms', '12 ms', '4.2 s', '15 s', '3 min', '1.5 h', '2.1 days'."""
    s = abs(seconds)
    if s < 1:
        ms = s * 1000
        return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2g} ms"
    if s < 120:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"

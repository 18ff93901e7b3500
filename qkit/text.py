"""Text cut to a length for messages, logs and figure labels (one definition for every caller)."""
from __future__ import annotations

from typing import Any


def clip(text: Any, limit: int, *, one_line: bool = False) -> str:
    """``str(text)`` cut to ``limit`` characters, the last one an ellipsis when cut.

    ``one_line``: every run of whitespace (newlines included) becomes one space first.
    """
    text = " ".join(str(text).split()) if one_line else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"

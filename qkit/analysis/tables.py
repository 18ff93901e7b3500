"""DataFrames formatted for people: what the notebooks show as tables.

:func:`for_people` returns a pandas ``Styler`` that reads like a report:
durations in ms or s with their unit (``12.3 ms``, ``4.2 s``, ``3.5 min``),
rates and shares as percentages, UTC times to the second without ``+00:00``,
counts with thousands separators, blanks instead of ``NaN``/``None``/``NaT``,
long texts cut, and a compact style that fits the page (wrapping cells, no
index unless it means something).  The frame itself is left unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

#: columns whose values are fractions 0..1 shown as percentages
_RATE_HINTS = ("rate", "share", "fraction")
_STYLE = [
    {"selector": "", "props": "border-collapse: collapse; font-size: 0.85em; max-width: 100%;"},
    {"selector": "caption", "props": "text-align: left; color: #555; padding-bottom: 4px;"},
    {"selector": "th", "props": "text-align: right; padding: 2px 4px; border-bottom: 1px solid #999; "
                                "white-space: normal; vertical-align: bottom; max-width: 7em;"},
    {"selector": "td", "props": "padding: 2px 4px; text-align: right; vertical-align: top; white-space: nowrap;"},
    {"selector": "td.col_text", "props": "text-align: left; white-space: normal; min-width: 6em; max-width: 30em; "
                                         "overflow-wrap: break-word;"},
]


def _blank(v: Any) -> bool:
    if v is None or v is pd.NaT:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def duration(seconds: Any) -> str:
    """A duration for people: ``850 µs``, ``12.3 ms``, ``4.20 s``, ``3.5 min``, ``2.1 h``; blank when missing."""
    if _blank(seconds):
        return ""
    s = float(seconds)
    a = abs(s)
    if a == 0:
        return "0 s"
    if a < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if a < 1:
        return f"{s * 1e3:.3g} ms" if a < 0.1 else f"{s * 1e3:.0f} ms"
    if a < 120:
        return f"{s:.3g} s"
    if a < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def percent(x: Any) -> str:
    return "" if _blank(x) else f"{float(x) * 100:.1f}%"


def utc_time(t: Any) -> str:
    """``2025-01-31 12:00:05`` (UTC, to the second); blank when missing."""
    if _blank(t) or t == "":
        return ""
    ts = pd.Timestamp(t)
    if pd.isna(ts):
        return ""
    ts = ts.tz_convert("UTC") if ts.tzinfo is not None else ts
    return ts.strftime("%Y-%m-%d %H:%M:%S")


def number(x: Any) -> str:
    if _blank(x):
        return ""
    if isinstance(x, bool):
        return str(x)
    f = float(x)
    if math.isfinite(f) and f == int(f) and abs(f) < 1e15:
        return f"{int(f):,}"
    return f"{f:,.3g}" if abs(f) < 1000 else f"{f:,.0f}"


def text(x: Any, limit: int = 160) -> str:
    if _blank(x):
        return ""
    if isinstance(x, (list, tuple)):
        x = ", ".join(map(str, x))
    s = str(x)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def formatter(name: str, series: pd.Series) -> Any:
    """The formatting function of one column, from its name and values."""
    low = str(name).lower()
    if pd.api.types.is_datetime64_any_dtype(series) or low.endswith(("_at", "_seen")) or low in ("at", "time"):
        return utc_time
    if pd.api.types.is_bool_dtype(series):
        return lambda v: "" if _blank(v) else ("yes" if v else "no")
    if low.endswith("_ms") and pd.api.types.is_numeric_dtype(series):
        return lambda v: duration(None if _blank(v) else float(v) / 1000)
    if (low.endswith("_s") or low in ("seconds", "duration")) and pd.api.types.is_numeric_dtype(series):
        return duration
    if any(h in low for h in _RATE_HINTS) and pd.api.types.is_numeric_dtype(series):
        return percent
    if pd.api.types.is_numeric_dtype(series):
        return number
    return text


def for_people(df: pd.DataFrame, *, index: bool | None = None, caption: str | None = None,
               max_rows: int = 200) -> Any:
    """A Styler of ``df`` formatted for people (see the module doc); at most ``max_rows`` rows.

    ``index``: show the index (default: only when it is not a plain 0..n-1 range).
    """
    if index is None:
        index = not isinstance(df.index, pd.RangeIndex)
    shown = df.head(max_rows)
    fmt = {c: formatter(str(c), shown[c]) for c in shown.columns}
    # headers wrap at their words ("exec p50", not "exec_p50_ms"); durations carry their own unit
    units = {c: (str(c).rsplit("_", 1)[0] if fmt[c] is not text and str(c).endswith(("_s", "_ms")) else str(c))
             for c in shown.columns}
    styler = shown.style.format(fmt).format_index(lambda v: text(units.get(v, v), 60).replace("_", " "), axis=1)
    if index:
        styler = styler.format_index(lambda v: utc_time(v) if isinstance(v, pd.Timestamp) else text(v, 60),
                                     axis=0)
    else:
        styler = styler.hide(axis="index")
    texts = [c for c in shown.columns if fmt[c] is text]
    styles = list(_STYLE)
    styler = styler.set_table_styles(styles)
    if texts:
        styler = styler.set_td_classes(pd.DataFrame(
            [["col_text" if c in texts else "" for c in shown.columns]] * len(shown),
            index=shown.index, columns=shown.columns))
    if caption or len(df) > max_rows:
        more = f" (first {max_rows} of {len(df):,} rows)" if len(df) > max_rows else ""
        styler = styler.set_caption(f"{caption or ''}{more}".strip())
    return styler


# ---------------------------------------------------------------- the notebooks' small summaries
def retry_overview(summary: pd.DataFrame, label: str) -> str:
    """One line: jobs, finished, dead-lettered, attempts and retries of a :func:`qkit.analysis.frames.type_summary`."""
    if summary.empty:
        return f"{label}: no jobs"
    jobs, done, dead = int(summary["jobs"].sum()), int(summary["completed"].sum()), int(summary["failed"].sum())
    finished = done + dead
    attempts = int(summary["attempts"].sum())
    share = f" ({dead / finished:.1%})" if finished else ""
    return (f"{label}: {jobs:,} jobs, {finished:,} finished, {dead:,} dead-lettered{share}; "
            f"{attempts:,} attempts ({max(0, attempts - jobs):,} retries)")


def attempts_pivot(dist: pd.DataFrame) -> Any:
    """Jobs by type and outcome (rows) and attempts used (columns), from :func:`qkit.analysis.frames.retry_distribution`."""
    if dist.empty:
        return "no finished jobs"
    wide = dist.pivot_table(index=["type", "outcome"], columns="attempts", values="jobs", aggfunc="sum",
                            fill_value=0)
    wide.columns = [f"{c} attempt{'s' if c != 1 else ''}" for c in wide.columns]
    return for_people(wide.reset_index())

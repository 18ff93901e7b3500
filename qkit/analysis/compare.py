"""Two sets of jobs side by side (two time windows or two seeded batches): what changed, and how sure we are.

For each job type and for all types together, three measures with a 95%
interval the sample sizes allow (:mod:`qkit.analysis.stats`): the success rate
(completed / finished jobs, Wilson), the attempts a finished job needed
(mean, normal approximation from the exact distribution), and the median
execution time of a successful attempt (order-statistic interval from the
database's histogram).  A change is called *clear* when the two intervals do
not overlap (a conservative test) and, for times, exceeds the histogram's 5%
resolution; otherwise it is within what chance gives at these sample sizes.  Everything is aggregated in SQL
(:mod:`qkit.ledger.analysis`), one pair of queries per side.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qkit.ledger import analysis as aq
from qkit.analysis.frames import scope
from qkit.analysis.stats import mean_interval, quantile_interval, wilson

if TYPE_CHECKING:
    from qkit.engine.queue import Queue

MEASURES = ("success rate", "attempts per finished job", "median execution time (ms)")
ALL_TYPES = "(all types)"


def split_default(q: "Queue") -> tuple[dict[str, Any], dict[str, Any]]:
    """Without parameters: the older and the newer half of the queue's jobs (by the midpoint of their enqueue times)."""
    from datetime import datetime, timezone

    first, last = aq.read(q.ledger, aq.created_bounds, scope(q))
    if first is None:
        return {}, {}
    mid = datetime.fromtimestamp((float(first) + float(last)) / 2, timezone.utc)
    return {"until": mid}, {"since": mid}


def _side(q: "Queue", filters: dict[str, Any]) -> list[dict[str, Any]]:
    sc = scope(q, **filters)
    jobs, stats = aq.read_together(q.ledger, (aq.job_outcomes, sc), (aq.attempt_stats, sc))
    rows = []
    types = sorted(jobs["type"].unique()) if len(jobs) else []
    for t in [*types, ALL_TYPES]:
        j = jobs if t == ALL_TYPES else jobs[jobs["type"] == t]
        s = stats if t == ALL_TYPES else stats[stats["type"] == t]
        done = j[j["status"].isin(["completed", "failed"])]
        n = int(done["jobs"].sum())
        ok = int(done.loc[done["status"] == "completed", "jobs"].sum())
        lo, hi = wilson(ok, n)
        rows.append({"type": t, "measure": MEASURES[0], "value": ok / n if n else np.nan, "low": float(lo),
                     "high": float(hi), "n": n})
        att = done["attempts"].to_numpy(dtype=float)
        w = done["jobs"].to_numpy(dtype=float)
        mean, mlo, mhi = mean_interval(w.sum(), (att * w).sum(), (att * att * w).sum())
        rows.append({"type": t, "measure": MEASURES[1], "value": mean, "low": mlo, "high": mhi, "n": n})
        good = s[(s["outcome"] == "completed") & s["bucket"].notna()].groupby("bucket")["n"].sum() if len(s) \
            else pd.Series(dtype=float)
        est, qlo, qhi = quantile_interval(aq.bucket_value(good.index.to_numpy()), good.to_numpy(), 0.5)
        rows.append({"type": t, "measure": MEASURES[2], "value": est, "low": qlo, "high": qhi,
                     "n": int(good.sum())})
    return rows


def compare(q: "Queue", a: dict[str, Any], b: dict[str, Any]) -> pd.DataFrame:
    """One row per (type, measure): ``a``, ``a_low``, ``a_high``, ``a_n``, the same for ``b``,
    ``change`` (b - a) and ``verdict`` (``clear increase``/``clear decrease``/``within noise``/``no data``).

    ``a`` and ``b`` are :func:`qkit.analysis.frames.scope` keyword arguments (since,
    until, type, priority, seed).
    """
    left = pd.DataFrame(_side(q, a), columns=["type", "measure", "value", "low", "high", "n"])
    right = pd.DataFrame(_side(q, b), columns=["type", "measure", "value", "low", "high", "n"])
    out = left.merge(right, on=["type", "measure"], how="outer", suffixes=("_a", "_b"))
    out = out.rename(columns={"value_a": "a", "value_b": "b", "low_a": "a_low", "high_a": "a_high", "n_a": "a_n",
                              "low_b": "b_low", "high_b": "b_high", "n_b": "b_n"})
    out["change"] = out["b"] - out["a"]

    def verdict(r: pd.Series) -> str:
        if pd.isna(r["a"]) or pd.isna(r["b"]):
            return "no data"
        if r["measure"] == MEASURES[2] and abs(r["change"]) <= r["a"] * (np.exp(1 / aq.BUCKETS_PER_E) - 1):
            return "within noise"  # inside one histogram bucket: below the resolution of the times
        if r["b_low"] > r["a_high"]:
            return "clear increase"
        if r["b_high"] < r["a_low"]:
            return "clear decrease"
        return "within noise"

    out["verdict"] = out.apply(verdict, axis=1) if len(out) else pd.Series(dtype=object)
    order = {m: i for i, m in enumerate(MEASURES)}
    out["_m"] = out["measure"].map(order)
    out["_t"] = out["type"].eq(ALL_TYPES)
    out = out.sort_values(["_m", "_t", "type"], ascending=[True, False, True]).drop(columns=["_m", "_t"])
    return out[["type", "measure", "a", "a_low", "a_high", "a_n", "b", "b_low", "b_high", "b_n", "change",
                "verdict"]].reset_index(drop=True)


def describe(filters: dict[str, Any]) -> str:
    """``since 2025-01-31 12:00:00 until …`` / ``seed 7`` for a side's filters."""
    parts = []
    for k, v in filters.items():
        if v is None or v == "":
            continue
        parts.append(f"{k} {v:%Y-%m-%d %H:%M:%S}" if hasattr(v, "strftime") else f"{k} {v}")
    return ", ".join(parts) or "all jobs"


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`compare`'s table as text for people: ``81.2% (78.0-84.1%)``, ``2.31 (2.25-2.37)``, ``412 ms (...)``."""
    from qkit.analysis.tables import duration

    def fmt(measure: str, v: float) -> str:
        if pd.isna(v):
            return ""
        if measure == MEASURES[0]:
            return f"{v * 100:.1f}%"
        if measure == MEASURES[2]:
            return duration(v / 1000)
        return f"{v:.2f}"

    rows = []
    for r in table.to_dict("records"):
        m = r["measure"]
        side = {s: (f"{fmt(m, r[s])} ({fmt(m, r[s + '_low'])} to {fmt(m, r[s + '_high'])})"
                    if not pd.isna(r[s]) else "") for s in ("a", "b")}
        change = "" if pd.isna(r["change"]) else (
            f"{r['change'] * 100:+.1f} points" if m == MEASURES[0] else
            f"{'+' if r['change'] >= 0 else '-'}{fmt(m, abs(r['change']))}")
        rows.append({"type": r["type"], "measure": m, "A": side["a"], "A jobs": r["a_n"], "B": side["b"],
                     "B jobs": r["b_n"], "change B - A": change, "verdict": r["verdict"]})
    return pd.DataFrame(rows, columns=["type", "measure", "A", "A jobs", "B", "B jobs", "change B - A", "verdict"])

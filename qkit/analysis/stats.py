"""Uncertainty from sample sizes: intervals for rates, means and percentiles (used by plots and compare).

All intervals are 95% by default.  Rates use Wilson's score interval (sound
for small n and rates near 0 or 1); means the normal approximation from
counts, sums and sums of squares; percentiles the distribution-free
order-statistic interval read from a histogram (:mod:`qkit.ledger.analysis`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: Any, n: Any, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (low, high) of successes/n, elementwise; NaN where n is 0."""
    k = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def mean_interval(n: Any, total: Any, total_sq: Any, z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) from a count, a sum and a sum of squares (normal approximation)."""
    n, total, total_sq = float(n), float(total), float(total_sq)
    if n <= 0:
        return float("nan"), float("nan"), float("nan")
    mean = total / n
    var = max(0.0, (total_sq - n * mean * mean) / (n - 1)) if n > 1 else float("nan")
    half = z * np.sqrt(var / n) if n > 1 else float("nan")
    return mean, mean - half, mean + half


def quantile_interval(values: Sequence[float], counts: Sequence[float], q: float = 0.5,
                      z: float = Z95) -> tuple[float, float, float]:
    """(estimate, low, high) of the q-quantile of a histogram (value, count), distribution-free.

    The interval's ends are the order statistics of rank n·q ∓ z·√(n·q·(1−q)).
    """
    v = np.asarray(values, dtype=float)
    c = np.asarray(counts, dtype=float)
    order = np.argsort(v)
    v, c = v[order], c[order]
    n = c.sum()
    if n <= 0:
        return float("nan"), float("nan"), float("nan")
    cum = np.cumsum(c)
    half = z * np.sqrt(n * q * (1 - q))

    def at(rank: float) -> float:
        return float(v[min(len(v) - 1, int(np.searchsorted(cum, min(max(1.0, np.ceil(rank)), n))))])

    return at(n * q), at(n * q - half), at(n * q + half)

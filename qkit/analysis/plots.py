"""The figures the notebooks show, drawn from :mod:`qkit.analysis.frames` DataFrames.

Each function takes a frame and returns a matplotlib ``Figure`` with a
title, axis labels with units, and a "no data yet" note instead of an empty
box.  Figures are built without pyplot (no global state, no backend
needed); display them with :func:`qkit.analysis.notebook_helpers.show`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib import dates as mdates, rc_context
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from qkit.text import clip

#: one colour per outcome or state, the same in every figure
COLORS = {
    "completed": "#2e7d32", "dlq": "#c62828", "failed": "#c62828", "timeout": "#ef6c00", "lost": "#6a1b9a",
    "pending": "#1565c0", "delayed": "#90caf9", "processing": "#f9a825", "ok": "#2e7d32",
    "interrupted": "#ef6c00", "kernel_died": "#6a1b9a", "error": "#424242", "running": "#1565c0",
    "cancelled": "#757575",
}
PERCENTILE_COLORS = {"p50": "#1565c0", "p90": "#f9a825", "p99": "#c62828"}
#: colours for job types: none of them green or red, which mean success and failure here
TYPE_COLORS = ("#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#8d6e63", "#ad1457", "#546e7a", "#9e9d24")


#: text sizes (pt) readable in a report at its width: figures are at most 10 in wide, shown at 100 dpi
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9.5,
         "ytick.labelsize": 9.5, "legend.fontsize": 9.5, "legend.title_fontsize": 9.5, "figure.titlesize": 13}
#: the smallest text any figure here uses (pt)
MIN_FONT = 9


def _figure(width: float = 9.0, height: float = 4.5, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    with rc_context(STYLE):
        fig = Figure(figsize=(min(width, 10.0), height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _legend_outside(ax: Any, **kw: Any) -> Any:
    """A legend right of the axes, off the data."""
    return ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), borderaxespad=0, **kw)


def caption(fig: Figure, text: str) -> Figure:
    """Say under the figure what it covers (queue, window, filters)."""
    if text:
        fig.supxlabel(text, fontsize=MIN_FONT + 0.5, color="#555555")
    return fig


def _titled(title: str, width: float = 9.0, height: float = 4.5) -> tuple[Figure, Any]:
    """A one-axes figure with its title set: the start of most plots here."""
    fig, axes = _figure(width, height)
    ax = axes[0][0]
    ax.set_title(title, fontsize=STYLE["figure.titlesize"])
    return fig, ax


def _no_data(ax: Any, text: str = "no data yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#757575")
    ax.set_xticks([])
    ax.set_yticks([])


def _naive_utc(values: Any) -> np.ndarray:
    """Aware timestamps -> naive UTC datetime64 that matplotlib plots directly."""
    idx = pd.DatetimeIndex(values)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    return idx.to_numpy()


def _time_axis(ax: Any, label: str = "time (UTC)") -> None:
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel(label)


# ---------------------------------------------------------------- retry analysis
def retry_distribution(dist: pd.DataFrame, *, title: str = "Attempts to success or to the DLQ, by job type") -> Figure:
    """Small multiples, one per type, each on its own y-scale: jobs by attempts used, completed (green)
    stacked with DLQ (red).  ``dist`` is :func:`qkit.analysis.frames.retry_distribution`.
    """
    types = sorted(dist["type"].unique()) if len(dist) else []
    ncols = min(2, max(1, len(types)))
    nrows = max(1, math.ceil(len(types) / ncols))
    fig, axes = _figure(10, 2.9 * nrows + 1.1, nrows, ncols)
    fig.suptitle(title)
    if not types:
        _no_data(axes[0][0], "no finished jobs yet")
        return fig
    top = int(dist["attempts"].max())
    xs = np.arange(1, top + 1)
    for i, ax in enumerate(axes.flat):
        if i >= len(types):
            ax.set_visible(False)
            continue
        sub = dist[dist["type"] == types[i]]
        bottom = np.zeros(len(xs))
        for outcome, label in (("completed", "completed"), ("dlq", "dead-lettered (DLQ)")):
            counts = sub[sub["outcome"] == outcome].set_index("attempts")["jobs"].reindex(xs, fill_value=0)
            ax.bar(xs, counts.to_numpy(), bottom=bottom, color=COLORS[outcome], label=label, width=0.7)
            bottom += counts.to_numpy()
        total = int(sub["jobs"].sum())
        dead = int(sub.loc[sub["outcome"] == "dlq", "jobs"].sum())
        ax.set_title(f"{types[i]}: {total:,} jobs, {dead:,} in DLQ ({dead / total:.0%})" if total else types[i])
        ax.set_xticks(xs)
        ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.12)  # each panel its own scale
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.grid(axis="y", alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("jobs (count)")
        ax.set_xlabel("attempts used")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return fig


def success_rate(summary: pd.DataFrame, *,
                 title: str = "Success rate by job type (completed / finished jobs)") -> Figure:
    """Horizontal bars of each type's success rate in %, labelled with the counts.

    ``summary`` is :func:`qkit.analysis.frames.type_summary`.
    """
    rows = summary.dropna(subset=["success_rate"]) if len(summary) else summary
    fig, ax = _titled(title, 9, 1.2 + 0.55 * max(1, len(rows)))
    if rows.empty:
        _no_data(ax, "no finished jobs yet")
        return fig
    rows = rows.sort_values("success_rate")
    pct = rows["success_rate"].to_numpy(dtype=float) * 100
    y = np.arange(len(rows))
    ax.barh(y, pct, color=COLORS["completed"], height=0.6)
    ax.barh(y, 100 - pct, left=pct, color=COLORS["dlq"], alpha=0.25, height=0.6)
    for yi, p, (_, r) in zip(y, pct, rows.iterrows()):
        label = f"{p:.1f}%  ({int(r['completed'])}/{int(r['completed'] + r['failed'])})"
        if p >= 30:  # inside the bar, else just right of it
            ax.text(p - 1, yi, label, va="center", ha="right", color="white", fontsize=9, fontweight="bold")
        else:
            ax.text(p + 1, yi, label, va="center", ha="left", color="black", fontsize=9)
    ax.set_yticks(y, rows["type"])
    ax.set_xlim(0, 100)
    ax.xaxis.set_major_formatter(PercentFormatter())
    ax.set_xlabel("success rate (% of finished jobs; red: dead-lettered)")
    return fig


def exec_time(times: pd.DataFrame, *, title: str = "Handler execution time per attempt, by job type") -> Figure:
    """Box plots of attempt duration (ms) per type: completed attempts next to failed/timed-out ones.

    ``times`` is :func:`qkit.analysis.frames.exec_times` (percentiles the database
    computed); boxes span p25..p75, whiskers p5..p95.  The legend sits
    under the axes, off the boxes.
    """
    fig, ax = _titled(title, 10, 5)
    if times.empty:
        _no_data(ax, "no finished attempts yet")
        return fig
    types = sorted(times["type"].unique())
    groups = [("completed", COLORS["completed"]), ("failed or timeout", COLORS["failed"])]
    width = 0.35
    handles = []
    for k, (group, color) in enumerate(groups):
        rows = times[times["group"] == group].set_index("type")
        stats, pos = [], []
        for i, t in enumerate(types):
            if t in rows.index and rows.loc[t, "n"] > 0:
                r = rows.loc[t]
                stats.append({"med": r["p50_ms"], "q1": r["p25_ms"], "q3": r["p75_ms"], "whislo": r["p5_ms"],
                              "whishi": r["p95_ms"], "mean": r["mean_ms"], "label": t})
                pos.append(i + (k - 0.5) * width)
        if not stats:
            continue
        bp = ax.bxp(stats, positions=pos, widths=width * 0.9, showfliers=False, patch_artist=True)
        for box in bp["boxes"]:
            box.set(facecolor=color, alpha=0.45, edgecolor=color)
        for median in bp["medians"]:
            median.set(color="black")
        handles.append((bp["boxes"][0], group))
    ax.set_xticks(range(len(types)), types)
    ax.set_xlim(-0.7, len(types) - 0.3)
    lo = times[["p5_ms"]].min().min()
    hi = times[["p95_ms"]].max().max()
    if lo > 0 and hi / lo > 50:
        ax.set_yscale("log")
    ax.set_ylabel("execution time (ms)")
    ax.set_xlabel("job type")
    ax.grid(axis="y", alpha=0.3)
    if handles:
        _legend_outside(ax, handles=[h for h, _ in handles], labels=[lab for _, lab in handles],
                        title="box p25-p75\nline p50\nwhiskers p5-p95")
    return fig


def attempt_outcomes(outcomes: pd.DataFrame, *,
                     title: str = "Does a retry help? Success rate of attempt n (band: 95% interval), by job type"
                     ) -> Figure:
    """One panel per type (shared 0-100% scale): the share of attempts number n that completed, with
    its 95% Wilson interval and ``n=`` (attempts made) under each point.

    ``outcomes`` is :func:`qkit.analysis.frames.attempt_outcomes`.
    """
    from qkit.analysis.stats import wilson

    types = sorted(outcomes["type"].unique()) if len(outcomes) else []
    ncols = min(2, max(1, len(types)))
    nrows = max(1, math.ceil(len(types) / ncols))
    fig, axes = _figure(10, 2.7 * nrows + 1.0, nrows, ncols, sharey=True)
    fig.suptitle(title)
    if not types:
        _no_data(axes[0][0], "no finished attempts yet")
        return fig
    top = int(outcomes["attempt"].max())
    for i, ax in enumerate(axes.flat):
        if i >= len(types):
            ax.set_visible(False)
            continue
        sub = outcomes[outcomes["type"] == types[i]].sort_values("attempt")
        x = sub["attempt"].to_numpy()
        n = sub["attempts"].to_numpy()
        lo, hi = wilson(sub["completed"].to_numpy(), n)
        y = sub["success_rate"].to_numpy(dtype=float) * 100
        color = TYPE_COLORS[i % len(TYPE_COLORS)]
        ax.fill_between(x, lo * 100, hi * 100, color=color, alpha=0.15, linewidth=0)
        ax.plot(x, y, marker="o", color=color)
        for xi, ni in zip(x, n):
            ax.text(xi, 2, f"n={int(ni):,}", ha="center", va="bottom", fontsize=MIN_FONT, color="#424242")
        ax.set_title(types[i])
        ax.set_xlim(0.5, top + 0.5)
        ax.set_ylim(0, 105)
        ax.yaxis.set_major_formatter(PercentFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("attempts completed")
        ax.set_xlabel("attempt number")
    return fig


# ---------------------------------------------------------------- monitoring
def _spiky(values: np.ndarray) -> bool:
    """True when one spike would flatten the rest: the peak is over 8x the 90th percentile of nonzero values."""
    nz = values[values > 0]
    return len(nz) >= 5 and float(nz.max()) > 8 * max(1.0, float(np.percentile(nz, 90)))


def queue_depth(depth: pd.DataFrame, *, title: str = "Queue depth over time (rebuilt from job events)") -> Figure:
    """Top: waiting and running jobs, one line per state (a log scale when a spike would flatten the rest);
    bottom: finished jobs, cumulative.  ``depth`` is :func:`qkit.analysis.frames.queue_depth`.
    """
    fig, axes = _figure(10, 6, 2, 1, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    fig.suptitle(title)
    if depth.empty:
        _no_data(top)
        _no_data(bottom)
        return fig
    # one more edge at the end of the last bin, so the last bin's value shows as a step too
    step = pd.Timedelta(depth.attrs.get("freq") or "1s")
    x = _naive_utc(depth.index.append(pd.DatetimeIndex([depth.index[-1] + step])))
    depth = pd.concat([depth, depth.iloc[[-1]]])
    active = {"pending": "pending (due)", "delayed": "delayed (retry back-off)", "processing": "processing"}
    for c, label in active.items():
        top.step(x, depth[c].to_numpy(), where="post", color=COLORS[c], label=label, linewidth=1.8)
    values = depth[list(active)].to_numpy().ravel()
    if _spiky(values):
        top.set_yscale("symlog", linthresh=1)
        top.set_ylim(0, None)
        top.set_title("waiting and running (log scale: one spike would flatten the rest)")
    else:
        top.set_ylim(0, max(1.0, float(values.max())) * 1.1)
        top.set_title("waiting and running")
        top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel("jobs (count)")
    _legend_outside(top)
    top.grid(alpha=0.3)
    finished = {"completed": "completed", "failed": "failed (DLQ)"}
    if "cancelled" in depth and depth["cancelled"].any():
        finished["cancelled"] = "cancelled"
    for c, label in finished.items():
        bottom.step(x, depth[c].to_numpy(), where="post", color=COLORS[c], linewidth=1.8, label=label)
    bottom.set_ylabel("jobs (cumulative)")
    bottom.set_title("finished")
    bottom.set_ylim(0, None)
    _legend_outside(bottom)
    bottom.grid(alpha=0.3)
    _time_axis(bottom, f"time (UTC), bins of {depth.attrs.get('freq', '?')}")
    return fig


def throughput(tp: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Stacked bars of finished attempts per time bin, by outcome.  ``tp`` is :func:`qkit.analysis.frames.throughput`."""
    freq = tp.attrs.get("freq", "bin")
    fig, ax = _titled(title or f"Throughput: attempts finished per {freq}, by outcome", 10, 4)
    if tp.empty or not tp.to_numpy().sum():
        _no_data(ax)
        return fig
    x = _naive_utc(tp.index)
    width = pd.Timedelta(freq).total_seconds() / 86400 * 0.85  # matplotlib dates are in days
    bottom = np.zeros(len(tp))
    for c in tp.columns:
        values = tp[c].to_numpy()
        if values.sum() == 0:
            continue
        ax.bar(x, values, bottom=bottom, width=width, align="edge", color=COLORS.get(c), label=c)
        bottom += values
    ax.set_ylabel(f"attempts per {freq}")
    _legend_outside(ax, title="outcome")
    ax.grid(axis="y", alpha=0.3)
    _time_axis(ax)
    return fig


def wait_times(waits: pd.DataFrame, *, title: str = "Wait from enqueue to first claim, by priority") -> Figure:
    """Grouped bars of wait p50/p90/p99 (s) per priority; a note where jobs still wait unclaimed.

    ``waits`` is :func:`qkit.analysis.frames.wait_times`.
    """
    fig, ax = _titled(title, 10, 4.5)
    if waits.empty:
        _no_data(ax, "no jobs yet")
        return fig
    rows = waits.sort_values("priority")
    x = np.arange(len(rows))
    width = 0.26
    for k, p in enumerate(("p50", "p90", "p99")):
        ax.bar(x + (k - 1) * width, rows[f"wait_{p}_s"].fillna(0).to_numpy(dtype=float), width,
               color=PERCENTILE_COLORS[p], label=p)
    for xi, (_, r) in zip(x, rows.iterrows()):
        if r["waiting"]:
            ax.annotate(f"{int(r['waiting']):,} waiting,\noldest {r['oldest_waiting_s']:.0f} s", (xi, 0),
                        textcoords="offset points", xytext=(0, 12), ha="center", fontsize=MIN_FONT,
                        color=COLORS["dlq"])
    ax.set_xticks(x, [f"{int(p)}\n({int(n):,} jobs)" for p, n in zip(rows["priority"], rows["jobs"])])
    ax.set_xlim(-0.5 - max(0, 2 - len(rows)) * 0.5, len(rows) - 0.5 + max(0, 2 - len(rows)) * 0.5)
    ax.set_xlabel("priority (higher runs first)")
    ax.set_ylabel("wait (s)")
    _legend_outside(ax, title="percentile")
    ax.grid(axis="y", alpha=0.3)
    return fig


def runs(history: pd.DataFrame, *, title: str = "Worker runs: jobs processed and duration per run",
         last: int = 40) -> Figure:
    """Per run (oldest left, the latest ``last``): jobs processed and duration (s), one marker per run in
    its status colour, so a run that processed nothing (or failed at once) still shows.

    ``history`` is :func:`qkit.analysis.frames.runs`; the scheduled runner's verdict
    (``run_status``) wins over the burst's own ``status``.
    """
    fig, axes = _figure(10, 5.5, 2, 1, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    h = history.tail(last)
    fig.suptitle(title if len(history) <= last else f"{title} (latest {last} of {len(history):,})")
    if history.empty:
        _no_data(top, "no worker runs yet")
        _no_data(bottom, "no worker runs yet")
        return fig
    status = h["run_status"].fillna(h["status"]) if "run_status" in h else h["status"]
    x = np.arange(len(h))
    colors = [COLORS.get(s, "#757575") for s in status]
    processed = h["processed"].fillna(0).to_numpy(dtype=float)
    top.bar(x, processed, color=colors, alpha=0.6, width=0.7)
    top.scatter(x, processed, c=colors, s=28, zorder=3, edgecolors="black", linewidths=0.4)
    top.set_ylabel("jobs processed")
    top.set_ylim(-0.05 * max(1.0, processed.max()), max(1.0, processed.max()) * 1.12)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.grid(axis="y", alpha=0.3)
    handles = [Patch(color=COLORS.get(s, "#757575"), label=s) for s in dict.fromkeys(status)]
    _legend_outside(top, handles=handles, title="status")
    duration = h["run_duration_s"].fillna(h["duration_s"]) if "run_duration_s" in h else h["duration_s"]
    dur = duration.fillna(0).to_numpy(dtype=float)
    bottom.bar(x, dur, color="#546e7a", width=0.7)
    bottom.scatter(x, dur, c=colors, s=18, zorder=3)
    bottom.set_ylabel("duration (s)")
    bottom.set_ylim(-0.05 * max(0.1, dur.max()), max(0.1, dur.max()) * 1.12)
    bottom.grid(axis="y", alpha=0.3)
    labels = [f"{t:%m-%d}\n{t:%H:%M:%S}\n{trig}" for t, trig in zip(h["started_at"], h["trigger"])]
    step = max(1, math.ceil(len(h) / 8))
    bottom.set_xticks(x[::step], labels[::step])
    bottom.set_xlim(-0.6, max(len(h), 8) - 0.4)
    bottom.set_xlabel("run start (UTC) and trigger, oldest left")
    return fig


def dlq_groups(groups: pd.DataFrame, *, title: str = "Dead-letter queue by error fingerprint and type") -> Figure:
    """Horizontal bars: jobs per (fingerprint, type) group, largest on top, each labelled with its
    fingerprint id.  ``groups`` is :func:`qkit.analysis.frames.dlq_groups`."""
    top = groups.head(15)
    fig, ax = _titled(title, 10, 1.3 + 0.45 * max(1, len(top)))
    if top.empty:
        _no_data(ax, "the DLQ is empty")
        return fig
    rows = top.iloc[::-1]
    y = np.arange(len(rows))
    ax.barh(y, rows["jobs"].to_numpy(), color=COLORS["dlq"], height=0.45)
    types = rows["type"] if "type" in rows else rows.get("types", [""] * len(rows))
    ids = rows["fingerprint_id"] if "fingerprint_id" in rows else [""] * len(rows)
    for yi, f, t, n, fid in zip(y, rows["fingerprint"], types, rows["jobs"], ids):
        ax.text(0, yi + 0.27, f"{int(n)}  {clip(f, 100)}  [{clip(t, 30)}]{f'  id {fid}' if fid else ''}",
                fontsize=MIN_FONT + 0.5, va="bottom")
    ax.set_yticks([])
    ax.set_ylim(-0.5, len(rows) - 0.1)
    ax.set_ylabel("error group")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("dead-lettered jobs (count)")
    ax.grid(axis="x", alpha=0.3)
    return fig


# ---------------------------------------------------------------- two sets of jobs
def compare(table: pd.DataFrame, *, labels: tuple[str, str] = ("A", "B"),
            title: str = "What changed from A to B (dots: estimate, bars: 95% interval)") -> Figure:
    """One panel per measure (each on its own scale), one row per type: A and B with their intervals.

    ``table`` is :func:`qkit.analysis.compare.compare`; rows whose intervals do not
    overlap are marked ``clear``.
    """
    measures = list(dict.fromkeys(table["measure"])) if len(table) else []
    types = list(dict.fromkeys(table["type"])) if len(table) else []
    fig, axes = _figure(10, 1.8 + 0.5 * max(1, len(types)), 1, max(1, len(measures)), sharey=True)
    fig.suptitle(title)
    if not measures:
        _no_data(axes[0][0], "no jobs to compare")
        return fig
    y = np.arange(len(types))[::-1]
    colors = ("#546e7a", "#1565c0")
    for ax, measure in zip(axes.flat, measures):
        rows = table[table["measure"] == measure].set_index("type").reindex(types)
        scale = 100.0 if measure == "success rate" else 1.0
        for k, side in enumerate(("a", "b")):
            v = rows[side].to_numpy(dtype=float) * scale
            lo = rows[f"{side}_low"].to_numpy(dtype=float) * scale
            hi = rows[f"{side}_high"].to_numpy(dtype=float) * scale
            yy = y + (0.15 if k == 0 else -0.15)
            err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
            ax.errorbar(v, yy, xerr=np.nan_to_num(err), fmt="o", color=colors[k], capsize=3, label=labels[k])
        for yi, verdict in zip(y, rows["verdict"]):
            if str(verdict).startswith("clear"):
                ax.annotate("clear", (1.0, yi), xycoords=("axes fraction", "data"), xytext=(-4, 0),
                            textcoords="offset points", ha="right", va="center", fontsize=MIN_FONT,
                            color="#b71c1c")
        ax.set_xlabel(measure + (" (%)" if scale == 100 else ""))
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    axes.flat[0].set_yticks(y, types)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return fig


# ---------------------------------------------------------------- what-if
def whatif(summary: pd.DataFrame, *, title: str = "Recorded failures replayed against other retry policies",
           highlight: Sequence[str] = ("current",)) -> Figure:
    """Three panels per policy: time to success (p50 bar, p90 tick), extra attempts, DLQ size.

    ``summary`` is ``qkit.analysis.whatif.simulate_queue(...).summary``.
    """
    fig, axes = _figure(10, 1.8 + 0.6 * max(1, len(summary)), 1, 3, sharey=True)
    fig.suptitle(title + "\n(time to success: first attempt to completion)")
    if summary.empty or not summary["jobs"].sum():
        for ax in axes.flat:
            _no_data(ax, "no finished jobs to replay yet")
        return fig
    rows = summary.iloc[::-1]
    y = np.arange(len(rows))
    colors = ["#1565c0" if p in highlight else "#37474f" if p == "recorded" else "#90a4ae" for p in rows["policy"]]
    a, b, c = axes[0]
    a.barh(y, rows["tts_mean_s"].fillna(0).to_numpy(dtype=float), color=colors, height=0.6, label="mean")
    a.scatter(rows["tts_p50_s"].fillna(0).to_numpy(dtype=float), y, marker="o", s=25, color="black", label="p50",
              zorder=3)
    a.scatter(rows["tts_p90_s"].fillna(0).to_numpy(dtype=float), y, marker="|", s=250, color="black", label="p90",
              zorder=3)
    a.set_xlabel("time to success (s)")
    fig.legend(*a.get_legend_handles_labels(), loc="outside lower left", ncols=3, title="time to success")
    b.barh(y, rows["extra_attempts"].to_numpy(dtype=float), color=colors, height=0.6)
    b.set_xlabel("extra attempts (retries)")
    c.barh(y, rows["dlq"].to_numpy(dtype=float), color=[COLORS["dlq"] if p not in highlight else "#b71c1c"
                                                        for p in rows["policy"]], height=0.6)
    c.set_xlabel("DLQ size (jobs, expected)")
    for ax, col, fmt in ((b, "extra_attempts", "{:.0f}"), (c, "dlq", "{:.1f}")):
        ax.margins(x=0.12)  # room for the value labels
        for yi, v in zip(y, rows[col].to_numpy(dtype=float)):
            ax.annotate(fmt.format(v), (v, yi), textcoords="offset points", xytext=(3, 0), va="center", fontsize=MIN_FONT)
    a.set_yticks(y, [clip(p, 42) for p in rows["policy"]])
    for ax in axes.flat:
        ax.grid(axis="x", alpha=0.3)
    return fig

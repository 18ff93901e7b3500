"""The figures the notebooks show, drawn from :mod:`qkit.frames` DataFrames.

Each function takes a frame and returns a matplotlib ``Figure`` with a
title, axis labels with units, and a "no data yet" note instead of an empty
box.  Figures are built without pyplot (no global state, no backend
needed); display them with :func:`qkit.notebook.show`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib import dates as mdates
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

#: one colour per outcome or state, the same in every figure
COLORS = {
    "completed": "#2e7d32", "dlq": "#c62828", "failed": "#c62828", "timeout": "#ef6c00", "lost": "#6a1b9a",
    "pending": "#1565c0", "delayed": "#90caf9", "processing": "#f9a825", "ok": "#2e7d32",
    "interrupted": "#ef6c00", "kernel_died": "#6a1b9a", "error": "#424242", "running": "#1565c0",
}
PERCENTILE_COLORS = {"p50": "#1565c0", "p90": "#f9a825", "p99": "#c62828"}
#: colours for job types: none of them green or red, which mean success and failure here
TYPE_COLORS = ("#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#8d6e63", "#ad1457", "#546e7a", "#9e9d24")


def _figure(width: float = 9.0, height: float = 4.5, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _titled(title: str, width: float = 9.0, height: float = 4.5) -> tuple[Figure, Any]:
    """A one-axes figure with its title set: the start of most plots here."""
    fig, axes = _figure(width, height)
    ax = axes[0][0]
    ax.set_title(title, fontsize=13)
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


def _short(text: str, n: int = 60) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------- retry analysis
def retry_distribution(dist: pd.DataFrame, *, title: str = "Attempts to success or to the DLQ, by job type") -> Figure:
    """Small multiples, one per type: jobs by attempts used, completed (green) stacked with DLQ (red).

    ``dist`` is :func:`qkit.frames.retry_distribution`.
    """
    types = sorted(dist["type"].unique()) if len(dist) else []
    ncols = min(4, max(1, len(types)))
    nrows = max(1, math.ceil(len(types) / ncols))
    fig, axes = _figure(3.4 * ncols + 1.5, 3.2 * nrows + 0.8, nrows, ncols, sharey=True)
    fig.suptitle(title, fontsize=13)
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
        ax.set_title(f"{types[i]}\n{total} jobs, {dead} in DLQ ({dead / total:.0%})" if total else types[i],
                     fontsize=10)
        ax.set_xticks(xs)
        ax.set_xlabel("attempts used (count)")
        ax.grid(axis="y", alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("jobs (count)")
    tallest = dist.groupby(["type", "attempts"])["jobs"].sum().max()
    axes.flat[0].set_ylim(0, max(1.0, float(tallest)) * 1.12)  # shared y: headroom for the tallest bar
    axes.flat[0].legend(loc="upper right", fontsize=8)
    return fig


def success_rate(summary: pd.DataFrame, *,
                 title: str = "Success rate by job type (completed / finished jobs)") -> Figure:
    """Horizontal bars of each type's success rate in %, labelled with the counts.

    ``summary`` is :func:`qkit.frames.type_summary`.
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


def exec_time(attempts: pd.DataFrame, *, title: str = "Handler execution time per attempt, by job type") -> Figure:
    """Box plots of attempt duration (ms) per type: completed attempts next to failed/timed-out ones.

    ``attempts`` is :func:`qkit.frames.attempts`; lost attempts (no
    handler result) are left out.  Whiskers span p5..p95.
    """
    fig, ax = _titled(title, 9, 4.8)
    ran = attempts[attempts["outcome"].isin(["completed", "failed", "timeout"])] if len(attempts) else attempts
    if ran.empty:
        _no_data(ax, "no finished attempts yet")
        return fig
    types = sorted(ran["type"].unique())
    groups = [("completed", ran["outcome"] == "completed"), ("failed or timeout", ran["outcome"] != "completed")]
    width = 0.35
    handles = []
    for k, (label, mask) in enumerate(groups):
        data = [ran.loc[mask & (ran["type"] == t), "duration_ms"].dropna().to_numpy() for t in types]
        pos = [i + (k - 0.5) * width for i in range(len(types))]
        keep = [(p, d) for p, d in zip(pos, data) if len(d)]
        if not keep:
            continue
        color = COLORS["completed"] if k == 0 else COLORS["failed"]
        bp = ax.boxplot([d for _, d in keep], positions=[p for p, _ in keep], widths=width * 0.9,
                        whis=(5, 95), showfliers=False, patch_artist=True)
        for box in bp["boxes"]:
            box.set(facecolor=color, alpha=0.45, edgecolor=color)
        for median in bp["medians"]:
            median.set(color="black")
        handles.append((bp["boxes"][0], label))
    ax.set_xticks(range(len(types)), types)
    ax.set_xlim(-0.7, len(types) - 0.3)
    values = ran["duration_ms"].dropna()
    if len(values) and values.min() > 0 and values.max() / values.min() > 50:
        ax.set_yscale("log")
    ax.set_ylabel("execution time (ms)")
    ax.set_xlabel("job type")
    ax.grid(axis="y", alpha=0.3)
    if handles:
        ax.legend([h for h, _ in handles], [f"{lab} (box p25-p75, whiskers p5-p95)" for _, lab in handles],
                  fontsize=8, loc="upper left")
    return fig


def attempt_outcomes(outcomes: pd.DataFrame, *, title: str = "Does a retry help? Success rate of attempt n, by job type"
                     ) -> Figure:
    """Lines of the share of attempts number n that completed, per type, with n marked on each point.

    ``outcomes`` is :func:`qkit.frames.attempt_outcomes`.
    """
    fig, ax = _titled(title, 9, 4.5)
    if outcomes.empty:
        _no_data(ax, "no finished attempts yet")
        return fig
    for i, (t, sub) in enumerate(outcomes.groupby("type")):
        sub = sub.sort_values("attempt")
        line, = ax.plot(sub["attempt"], sub["success_rate"] * 100, marker="o", label=t,
                        color=TYPE_COLORS[i % len(TYPE_COLORS)])
        dy = (6, -13, 15, -22)[i % 4]  # labels of types meeting at one point do not overlap
        for x, y, n in zip(sub["attempt"], sub["success_rate"] * 100, sub["attempts"]):
            ax.annotate(f"n={int(n)}", (x, y), textcoords="offset points", xytext=(5, dy), fontsize=7,
                        color=line.get_color())
    ax.set_ylim(-3, 105)
    ax.yaxis.set_major_formatter(PercentFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("attempt number")
    ax.set_ylabel("attempts that completed (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="job type", title_fontsize=8)
    return fig


# ---------------------------------------------------------------- monitoring
def queue_depth(depth: pd.DataFrame, *, title: str = "Queue depth over time (rebuilt from job events)") -> Figure:
    """Top: waiting and running jobs (stacked); bottom: finished jobs, cumulative.

    ``depth`` is :func:`qkit.frames.queue_depth`.
    """
    fig, axes = _figure(10, 6, 2, 1, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    fig.suptitle(title, fontsize=13)
    if depth.empty:
        _no_data(top)
        _no_data(bottom)
        return fig
    x = _naive_utc(depth.index)
    active = ["pending", "delayed", "processing"]
    top.stackplot(x, *[depth[c].to_numpy() for c in active], step="post",
                  labels=["pending (due)", "delayed (retry back-off)", "processing"],
                  colors=[COLORS[c] for c in active], alpha=0.85)
    top.set_ylabel("jobs (count)")
    top.set_title("waiting and running", fontsize=10)
    top.legend(fontsize=8, loc="upper right")
    top.grid(alpha=0.3)
    for c in ("completed", "failed"):
        bottom.step(x, depth[c].to_numpy(), where="post", color=COLORS[c],
                    label="completed" if c == "completed" else "failed (DLQ)")
    bottom.set_ylabel("jobs (count, cumulative)")
    bottom.set_title("finished", fontsize=10)
    bottom.legend(fontsize=8, loc="upper left")
    bottom.grid(alpha=0.3)
    _time_axis(bottom)
    return fig


def throughput(tp: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Stacked bars of finished attempts per time bin, by outcome.  ``tp`` is :func:`qkit.frames.throughput`."""
    freq = tp.attrs.get("freq", "bin")
    fig, ax = _titled(title or f"Throughput: attempts finished per {freq}, by outcome", 10, 4)
    if tp.empty:
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
    ax.set_ylabel(f"attempts per {freq} (count)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    _time_axis(ax)
    return fig


def wait_times(waits: pd.DataFrame, *, title: str = "Wait from enqueue to first claim, by priority") -> Figure:
    """Grouped bars of wait p50/p90/p99 (s) per priority; a note where jobs still wait unclaimed.

    ``waits`` is :func:`qkit.frames.wait_times`.
    """
    fig, ax = _titled(title, 9, 4.5)
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
            ax.annotate(f"{int(r['waiting'])} waiting,\noldest {r['oldest_waiting_s']:.0f} s", (xi, 0),
                        textcoords="offset points", xytext=(0, 12), ha="center", fontsize=8, color=COLORS["dlq"])
    ax.set_xticks(x, [f"{int(p)}\n({int(n)} jobs)" for p, n in zip(rows["priority"], rows["jobs"])])
    ax.set_xlim(-0.5 - max(0, 2 - len(rows)) * 0.5, len(rows) - 0.5 + max(0, 2 - len(rows)) * 0.5)
    ax.set_xlabel("priority (higher runs first)")
    ax.set_ylabel("wait (s)")
    ax.legend(fontsize=8, title="percentile", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def runs(history: pd.DataFrame, *, title: str = "Worker runs: jobs processed and duration per run") -> Figure:
    """Per run (oldest left): jobs processed (bar coloured by status) and duration (s).

    ``history`` is :func:`qkit.frames.runs`; the scheduled runner's verdict
    (``run_status``) wins over the burst's own ``status``.
    """
    fig, axes = _figure(10, 5.5, 2, 1, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    fig.suptitle(title, fontsize=13)
    if history.empty:
        _no_data(top, "no worker runs yet")
        _no_data(bottom, "no worker runs yet")
        return fig
    h = history.tail(60)
    status = h["run_status"].fillna(h["status"]) if "run_status" in h else h["status"]
    x = np.arange(len(h))
    colors = [COLORS.get(s, "#757575") for s in status]
    top.bar(x, h["processed"].to_numpy(), color=colors)
    top.set_ylabel("jobs processed (count)")
    top.grid(axis="y", alpha=0.3)
    handles = [Patch(color=COLORS.get(s, "#757575"), label=s) for s in dict.fromkeys(status)]
    top.legend(handles=handles, fontsize=8, title="status", title_fontsize=8, loc="upper left")
    duration = h["run_duration_s"].fillna(h["duration_s"]) if "run_duration_s" in h else h["duration_s"]
    bottom.bar(x, duration.fillna(0).to_numpy(dtype=float), color="#546e7a")
    bottom.set_ylabel("duration (s)")
    bottom.grid(axis="y", alpha=0.3)
    labels = [f"{t:%m-%d}\n{t:%H:%M:%S}\n{trig}" for t, trig in zip(h["started_at"], h["trigger"])]
    step = max(1, len(h) // 12)
    bottom.set_xticks(x[::step], labels[::step], fontsize=7)
    bottom.set_xlabel("run start (UTC) and trigger, oldest left")
    return fig


def dlq_groups(groups: pd.DataFrame, *, title: str = "Dead-letter queue by error fingerprint and type") -> Figure:
    """Horizontal bars: jobs per (fingerprint, type) group, largest on top, each labelled with its
    fingerprint id.  ``groups`` is :func:`qkit.frames.dlq_groups`."""
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
        ax.text(0, yi + 0.27, f"{int(n)}  {_short(f, 100)}  [{_short(t, 30)}]{f'  id {fid}' if fid else ''}",
                fontsize=8, va="bottom")
    ax.set_yticks([])
    ax.set_ylim(-0.5, len(rows) - 0.1)
    ax.set_ylabel("error group")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("dead-lettered jobs (count)")
    ax.grid(axis="x", alpha=0.3)
    return fig


# ---------------------------------------------------------------- what-if
def whatif(summary: pd.DataFrame, *, title: str = "Recorded failures replayed against other retry policies",
           highlight: Sequence[str] = ("current",)) -> Figure:
    """Three panels per policy: time to success (p50 bar, p90 tick), extra attempts, DLQ size.

    ``summary`` is ``qkit.whatif.replay(...).summary``.
    """
    fig, axes = _figure(13, 1.6 + 0.55 * max(1, len(summary)), 1, 3, sharey=True)
    fig.suptitle(title, fontsize=13)
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
    a.set_xlabel("time to success (s), first attempt to completion")
    fig.legend(*a.get_legend_handles_labels(), loc="outside lower left", ncols=3, fontsize=8,
               title="time to success", title_fontsize=8)
    b.barh(y, rows["extra_attempts"].to_numpy(dtype=float), color=colors, height=0.6)
    b.set_xlabel("extra attempts (retries, count)")
    c.barh(y, rows["dlq"].to_numpy(dtype=float), color=[COLORS["dlq"] if p not in highlight else "#b71c1c"
                                                        for p in rows["policy"]], height=0.6)
    c.set_xlabel("DLQ size (jobs, expected)")
    for ax, col, fmt in ((b, "extra_attempts", "{:.0f}"), (c, "dlq", "{:.1f}")):
        ax.margins(x=0.12)  # room for the value labels
        for yi, v in zip(y, rows[col].to_numpy(dtype=float)):
            ax.annotate(fmt.format(v), (v, yi), textcoords="offset points", xytext=(3, 0), va="center", fontsize=8)
    a.set_yticks(y, [_short(p, 42) for p in rows["policy"]], fontsize=8)
    for ax in axes.flat:
        ax.grid(axis="x", alpha=0.3)
    return fig

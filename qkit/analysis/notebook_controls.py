"""The notebooks' control bar: queue, time window, type and priority, and a live mode.

In JupyterLab a notebook shows one bar of ipywidgets; each *view* (a
function of a :class:`Filters` returning figures, tables and text) renders
into its own output area and is redrawn whenever a control changes.  Under
papermill, nbval or a plain kernel the same notebook draws each view once
from its parameters, with no widget at all (:func:`interactive` decides).

Live mode (``Controls(..., live=True)``, used by ``queue_monitor``) adds a
Live/Stop toggle: while on, the views are recomputed every ``every``
seconds by an asyncio task on the kernel's own event loop, the SQL and
drawing running in a worker thread, so the kernel keeps answering; it stops
on Stop, or by itself after ``live_for`` seconds.

A queue that has no jobs or runs in the ledger, while others do, is refused
with the list of queues that exist (a typo shows at once, not as empty
charts).
"""
from __future__ import annotations

import asyncio
import base64
import html
import io
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

from qkit.analysis.notebook_helpers import ParameterError

#: the time windows offered, label -> length (None: everything)
WINDOWS = {"all time": None, "last 15 min": timedelta(minutes=15), "last hour": timedelta(hours=1),
           "last 6 hours": timedelta(hours=6), "last 24 hours": timedelta(days=1), "last 7 days": timedelta(days=7)}
PARAMS_WINDOW = "as in the parameters"
ALL = "(all)"


def interactive() -> bool:
    """True in a Jupyter frontend's kernel (JupyterLab, Notebook): widgets will be seen.

    jupyter_server puts ``JPY_SESSION_NAME`` in its kernels' environment;
    papermill and nbval do not.  ``QKIT_WIDGETS=0|1`` overrides.
    """
    forced = os.environ.get("QKIT_WIDGETS")
    if forced in ("0", "1"):
        return forced == "1"
    if "ipykernel" not in sys.modules or not os.environ.get("JPY_SESSION_NAME"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def progress(**kw: Any) -> Any:
    """A progress bar: tqdm.auto's widget in Lab, plain text on stdout otherwise (papermill logs, no
    red stderr box in the executed notebook)."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(**kw)
    from tqdm import tqdm

    return tqdm(file=sys.stdout, ascii=True, **kw)


def check_queue(q: Any) -> list[str]:
    """The ledger's queues; raises ParameterError naming them if ``q``'s queue is not one (and some exist)."""
    from qkit.analysis import frames

    names = frames.queues(q)
    if names and q.name not in names:
        raise ParameterError(f"queue {q.name!r} has no jobs or worker runs in this ledger; its queues: "
                             f"{', '.join(names)}")
    return names


@dataclass
class Filters:
    """What the controls select, for a view: the queue (``q``), the window and the job filters."""

    q: Any
    since: datetime | None = None
    until: datetime | None = None
    type: str | None = None
    priority: int | None = None
    window: str = ""
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    _memo: dict = field(default_factory=dict, repr=False)

    def get(self, fn: Callable[..., Any], **kw: Any) -> Any:
        """``fn(q, **kw)``, computed once per drawing: views sharing a frame share its queries."""
        key = (fn, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in self._memo:
            self._memo[key] = fn(self.q, **kw)
        return self._memo[key]

    @property
    def jobs(self) -> dict[str, Any]:
        """Keyword arguments of the qkit.analysis.frames analyses: jobs enqueued in the window, of the type/priority."""
        return {"since": self.since, "until": self.until, "type": self.type, "priority": self.priority}

    @property
    def series(self) -> dict[str, Any]:
        """Keyword arguments of the time series (queue_depth, throughput): the window bounds the x-axis."""
        return {"start": self.since, "end": self.until, "type": self.type, "priority": self.priority,
                "now": self.now}

    @property
    def label(self) -> str:
        """One line saying what the figures cover."""
        parts = [f"queue {self.q.name}"]
        if self.window and self.window not in ("all time", PARAMS_WINDOW):
            parts.append(self.window)
        if self.since or self.until:
            span = f"{_short_time(self.since) or '…'} to {_short_time(self.until) or 'now'} (UTC)"
            parts.append(span)
        parts.append(f"type {self.type}" if self.type else "all types")
        parts.append(f"priority {self.priority}" if self.priority is not None else "all priorities")
        return " · ".join(parts)


def _short_time(t: datetime | None) -> str:
    return "" if t is None else t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- rendering the things a view returns
def _as_html(item: Any, caption: str) -> str:
    from matplotlib.figure import Figure

    from qkit.analysis import plots, tables

    if isinstance(item, Figure):
        plots.caption(item, caption)
        buf = io.BytesIO()
        item.savefig(buf, format="png", dpi=100)
        title = item._suptitle.get_text() if getattr(item, "_suptitle", None) is not None else \
            (item.axes[0].get_title() if item.axes else "figure")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}" style="max-width:100%"/>'
    if hasattr(item, "to_html") and hasattr(item, "data"):  # a Styler
        return item.to_html()
    if hasattr(item, "to_frame") or hasattr(item, "columns"):
        return tables.for_people(item).to_html()
    return f"<pre>{html.escape(str(item))}</pre>"


def _show(item: Any, caption: str) -> None:
    from IPython.display import display
    from matplotlib.figure import Figure

    from qkit.analysis import plots, tables
    from qkit.analysis.notebook_helpers import show

    if isinstance(item, Figure):
        show(plots.caption(item, caption))
    elif hasattr(item, "columns") and not hasattr(item, "data"):
        display(tables.for_people(item))
    elif isinstance(item, str):
        print(item)
    else:
        display(item)


View = Callable[[Filters], Sequence[Any]]


class Controls:
    """The control bar of a notebook (see the module doc).

    ``q`` is the connected queue (its name is the starting queue);
    ``since``/``until`` (ISO 8601 or "") and ``job_type``/``priority`` ("" /
    None for all) are the notebook's parameters.
    """

    def __init__(self, q: Any, *, since: Any = "", until: Any = "", job_type: str = "",
                 priority: int | None = None, live: bool = False, every: float = 5.0,
                 live_for: float = 600.0) -> None:
        from qkit.utc import as_utc

        self.queues = check_queue(q)
        self._queues: dict[str, Any] = {q.name: q}
        self.q = q
        self.since, self.until = as_utc(since), as_utc(until)
        self.type = job_type or None
        self.priority = None if priority is None or priority == "" else int(priority)
        self.window = PARAMS_WINDOW if (self.since or self.until) else "all time"
        self.interactive = interactive()
        self.every, self.live_for = float(every), float(live_for)
        self.views: list[tuple[View, Any]] = []
        self.redraws = 0
        self._task: asyncio.Task | None = None
        self._bar = self._build(live) if self.interactive else None

    # ------------------------------------------------------------ state
    def filters(self) -> Filters:
        """What the controls select now.  Without widgets: one Filters for the whole notebook (one "now",
        shared frames)."""
        if not self.interactive:
            if getattr(self, "_fixed", None) is None:
                self._fixed = self._filters()
            return self._fixed
        return self._filters()

    def _filters(self) -> Filters:
        now = datetime.now(timezone.utc)
        since, until = self.since, self.until
        length = WINDOWS.get(self.window)
        if self.window in WINDOWS:
            since, until = (None, None) if length is None else (now - length, None)
        return Filters(self.q, since=since, until=until, type=self.type, priority=self.priority,
                       window=self.window, now=now)

    def _queue(self, name: str) -> Any:
        if name not in self._queues:
            import qkit

            self._queues[name] = qkit.connect(queue=name)
        return self._queues[name]

    # ------------------------------------------------------------ widgets
    def _build(self, live: bool) -> Any:
        import ipywidgets as w

        from qkit.analysis import frames

        names = sorted(set(self.queues) | {self.q.name})
        windows = ([PARAMS_WINDOW] if self.window == PARAMS_WINDOW else []) + list(WINDOWS)
        self.w_queue = w.Dropdown(options=names, value=self.q.name, description="queue",
                                  layout=w.Layout(width="210px"))
        self.w_window = w.Dropdown(options=windows, value=self.window, description="window",
                                   layout=w.Layout(width="260px"))
        self.w_type = w.Dropdown(description="type", layout=w.Layout(width="260px"))
        self.w_priority = w.Dropdown(description="priority", layout=w.Layout(width="170px"))
        self._fill_choices(frames.choices(self.q))
        self.status = w.HTML(layout=w.Layout(margin="0 0 0 12px"))
        items = [self.w_queue, self.w_window, self.w_type, self.w_priority]
        if live:
            self.w_live = w.ToggleButton(value=False, description="Live", icon="play",
                                         tooltip=f"refresh every {self.every:g} s (stops after "
                                                 f"{self.live_for / 60:g} min)", layout=w.Layout(width="90px"))
            self.w_live.observe(self._on_live, names="value")
            items.append(self.w_live)
        self.w_queue.observe(self._on_queue, names="value")
        for widget in (self.w_window, self.w_type, self.w_priority):
            widget.observe(self._on_change, names="value")
        return w.VBox([w.HBox(items, layout=w.Layout(flex_flow="row wrap")), self.status])

    def _fill_choices(self, ch: dict[str, list]) -> None:
        types = [ALL, *ch["type"]]
        prios = [ALL, *[str(p) for p in ch["priority"]]]
        self._quiet = True
        self.w_type.options = types
        self.w_type.value = self.type if self.type in types else ALL
        self.w_priority.options = prios
        self.w_priority.value = str(self.priority) if str(self.priority) in prios else ALL
        self._quiet = False

    def _on_queue(self, change: dict) -> None:
        from qkit.analysis import frames

        self.q = self._queue(change["new"])
        self._fill_choices(frames.choices(self.q))
        self._on_change(None)

    def _on_change(self, _change: Any) -> None:
        if getattr(self, "_quiet", False):
            return
        self.window = self.w_window.value
        self.type = None if self.w_type.value == ALL else self.w_type.value
        self.priority = None if self.w_priority.value == ALL else int(self.w_priority.value)
        self.redraw()

    # ------------------------------------------------------------ views
    def record(self, name: str, value: Any) -> None:
        """:func:`qkit.analysis.notebook_helpers.record` for papermill's executed notebook (Lab has no renderer for it)."""
        if not self.interactive:
            from qkit.analysis.notebook_helpers import record

            record(name, value)

    def render(self, view: View) -> None:
        """Show a view: in Lab, in its own area (the bar above the first one) and redrawn on every change;
        otherwise drawn once, here."""
        if not self.interactive:
            f = self.filters()
            for item in view(f):
                _show(item, f.label)
            return
        import ipywidgets as w
        from IPython.display import display

        area = w.HTML()
        if not self.views:
            display(self._bar)
        self.views.append((view, area))
        display(area)
        # the cells run one after the other: they share one drawing (and its frames) until a control changes
        f = self._shared = getattr(self, "_shared", None) or self.filters()
        area.value = self._html(view, f)
        self._say(f)

    def _html(self, view: View, f: Filters) -> str:
        try:
            return "".join(_as_html(item, f.label) for item in view(f))
        except Exception as exc:  # noqa: BLE001 - shown in the view's area; the kernel carries on
            from qkit.config import redact

            return f'<pre style="color:#b71c1c">{html.escape(type(exc).__name__)}: ' \
                   f'{html.escape(redact(str(exc)))}</pre>'

    def _compute(self) -> tuple[Filters, list[str]]:
        f = self._shared = self.filters()
        return f, [self._html(view, f) for view, _ in self.views]

    def _apply(self, f: Filters, pages: list[str]) -> None:
        for (_, area), page in zip(self.views, pages):
            area.value = page
        self.redraws += 1
        self._say(f)

    def redraw(self) -> None:
        """Recompute every view with the current controls (in Lab)."""
        self._apply(*self._compute())

    def _say(self, f: Filters) -> None:
        if self._bar is None:
            return
        live = self._task is not None and not self._task.done()
        mode = f"live, every {self.every:g} s · " if live else ""
        self.status.value = f'<span style="color:#555">{mode}{html.escape(f.label)} · drawn at ' \
                            f'{f.now:%H:%M:%S} UTC</span>'

    # ------------------------------------------------------------ live mode
    def _on_live(self, change: dict) -> None:
        if change["new"]:
            self.start_live()
        else:
            self.stop_live()

    def start_live(self) -> None:
        """Refresh every ``every`` s on the kernel's event loop until stopped or ``live_for`` s passed."""
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_event_loop().create_task(self._live_loop())
        self.w_live.description, self.w_live.icon = "Stop", "stop"

    def stop_live(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        self._live_ended()

    def _live_ended(self) -> None:
        if getattr(self, "w_live", None) is not None:
            self.w_live.unobserve(self._on_live, names="value")
            self.w_live.value = False
            self.w_live.description, self.w_live.icon = "Live", "play"
            self.w_live.observe(self._on_live, names="value")
        self._say(self.filters())

    async def _live_loop(self) -> None:
        deadline = time.monotonic() + self.live_for
        loop = asyncio.get_event_loop()
        try:
            while time.monotonic() < deadline:
                f, pages = await loop.run_in_executor(None, self._compute)  # SQL and drawing off the loop
                self._apply(f, pages)
                await asyncio.sleep(max(0.0, min(self.every, deadline - time.monotonic())))
        except asyncio.CancelledError:
            pass
        finally:
            self._task = None
            self._live_ended()

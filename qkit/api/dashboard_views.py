"""How the dashboard's pages are drawn and served: the Jinja2 templates, numbers and times for people, the
sparkline, the endpoint wrapper (:func:`page`) and what every page asks first (the viewer, the ledger, a queue).

Templates live in ``qkit/api/templates/`` and autoescape everything; static
files (``style.css``, the vendored ``htmx.min.js``) in ``qkit/api/static/``.
Every page is sent with a strict Content-Security-Policy: scripts and styles
only from this server, no inline script, no framing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from qkit.api.dashboard_auth import Viewer, viewer
from qkit.api.errors import ApiError, guard
from qkit.api.holder import holder
from qkit.ledger import utcnow
from qkit.model import check_name
from qkit.text import duration as text_duration

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
#: the pages' policy: nothing inline, nothing from elsewhere (the sparkline is inline SVG, not a script)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
#: the live parts poll this often (the issue asks for at most 5 s)
REFRESH_SECONDS = 3
#: what a page says after an action (``?done=`` names one; ``n`` is the only thing a link can vary)
NOTICES = {
    "replayed": "Replayed {n} job(s): they are pending again.",
    "purged": "Purged {n} job(s) from the DLQ, with their history.",
    "cancelled": "Cancelled.",
    "cancel_requested": "Cancel requested: the job is running; it ends cancelled if its handler returns.",
    "not_cancelled": "Not cancelled: the job had already finished.",
}


# ---------------------------------------------------------------- numbers and times for people
def number(value: Any) -> str:
    """12345 -> '12,345'; None -> '–'."""
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def duration(seconds: float | None) -> str:
    """:func:`qkit.text.duration`, and '–' for None."""
    return "–" if seconds is None else text_duration(seconds)


def when(value: datetime | None) -> str:
    """An aware time as 'YYYY-MM-DD HH:MM:SS' in UTC; None -> '–'."""
    if value is None:
        return "–"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """'12 s ago', 'in 3 min 5 s' (relative to the ledger's clock)."""
    if value is None:
        return ""
    delta = ((now or utcnow()) - value).total_seconds()
    return f"{duration(delta)} ago" if delta >= 0 else f"in {duration(-delta)}"


def cell(value: Any) -> str:
    """Any value of a listing (a schedule, a limit) as text: times in UTC, numbers grouped, JSON for the rest."""
    if value is None:
        return "–"
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, (int, float)):
        return number(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


# ---------------------------------------------------------------- the sparkline
@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    ok_y: float
    ok_h: float
    bad_y: float
    bad_h: float


@dataclass(frozen=True)
class Sparkline:
    """Stacked bars (completed below, failed on top) of jobs finished per bin, drawn as inline SVG."""

    width: int
    height: int
    bars: tuple[Bar, ...]
    completed: int
    failed: int
    peak: int
    label: str

    @property
    def success_rate(self) -> float | None:
        done = self.completed + self.failed
        return self.completed / done if done else None


def sparkline(bins: Sequence[tuple[int, int]], *, minutes: float, width: int = 180, height: int = 32) -> Sparkline:
    """The sparkline of ``bins`` of (completed, failed), oldest first, covering the last ``minutes``."""
    peak = max((c + f for c, f in bins), default=0)
    step = width / max(len(bins), 1)
    bars = []
    for i, (ok, bad) in enumerate(bins):
        ok_h = (height - 1) * ok / peak if peak else 0.0
        bad_h = (height - 1) * bad / peak if peak else 0.0
        bars.append(Bar(round(i * step + 0.5, 2), round(max(step - 1, 1), 2), round(height - ok_h, 2),
                        round(ok_h, 2), round(height - ok_h - bad_h, 2), round(bad_h, 2)))
    completed = sum(c for c, _ in bins)
    failed = sum(f for _, f in bins)
    rate = f", {percent(completed / (completed + failed))} succeeded" if completed + failed else ""
    label = (f"last {minutes:g} min: {completed:,} completed, {failed:,} failed{rate}; "
             f"peak {peak:,} per {minutes * 60 / max(len(bins), 1):g} s")
    return Sparkline(width, height, tuple(bars), completed, failed, peak, label)


# ---------------------------------------------------------------- serving a page
Page = Callable[[Request], Awaitable[Response]]


def page(fn: Page) -> Page:
    """An endpoint answering HTML: :func:`qkit.api.errors.guard`'s answers, as pages (a GET without a session
    goes to the login form)."""
    guarded = guard(fn)

    async def endpoint(request: Request) -> Response:
        response = await guarded(request)
        if response.status_code < 400 or response.media_type != "application/json":
            return response
        text = json.loads(bytes(response.body)).get("error", "error")
        if response.status_code == 401 and "hx-request" in request.headers:  # a live part: the whole page goes
            return Response(status_code=200, headers={"HX-Redirect": "/login"})
        if response.status_code == 401 and request.method in ("GET", "HEAD"):
            return RedirectResponse("/login?" + urlencode({"next": request.url.path + (
                "?" + request.url.query if request.url.query else "")}), status_code=303)
        return message_page(request, viewer(request), response.status_code, f"{response.status_code}", text)

    endpoint.__name__ = fn.__name__
    endpoint.__doc__ = fn.__doc__
    return endpoint


def signed_in(request: Request, *, operator: bool = False) -> Viewer:
    """The viewer; 401 without a session; ``operator``: 403 for a user (their own jobs only)."""
    who = viewer(request)
    if who is None:
        raise ApiError(401, "sign in first")
    if operator and who.role == "user":
        raise ApiError(403, "this page is for operators; you see your own jobs")
    return who


def ledger(request: Request) -> Any:
    """The ledger (one database for every queue), through the served queue."""
    return holder(request).get().ledger


def queue_of(request: Request, name: str) -> Any:
    """The :class:`qkit.engine.queue.Queue` named ``name``, on the served queue's Redis and ledger."""
    return holder(request).named(check_name(name, "queue name"))


def queue_param(request: Request, default: str | None = None) -> str | None:
    value = request.query_params.get("queue", "").strip()
    return check_name(value, "queue name") if value else default



# ---------------------------------------------------------------- rendering
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(number=number, percent=percent, duration=duration, when=when, ago=ago,
                       pretty_json=pretty_json)
    env.globals["refresh_seconds"] = REFRESH_SECONDS
    return env


templates = Jinja2Templates(env=_environment())


def notice(request: Request) -> str | None:
    """The message a redirect after an action asked for (``?done=...&n=...``), if any."""
    text = NOTICES.get(request.query_params.get("done", ""))
    n = request.query_params.get("n", "")
    return text.format(n=f"{int(n):,}" if n.isdigit() and len(n) < 10 else "some") if text else None


def render(request: Request, name: str, who: Viewer | None, status_code: int = 200, **context: Any) -> Response:
    """A page (or fragment) from template ``name``, with the viewer, the CSRF token and the security headers."""
    context.setdefault("title", "qkit")
    context.setdefault("notice", notice(request))
    response = templates.TemplateResponse(request, name, {"viewer": who, "now": utcnow(), **context},
                                          status_code=status_code)
    return secure(response)


def secure(response: Response) -> Response:
    """The headers every dashboard answer carries: CSP, no sniffing, no referrer, never cached."""
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def message_page(request: Request, who: Viewer | None, status: int, title: str, text: str) -> Response:
    """A short page saying one thing (an error, or what an action did), with a way back."""
    return render(request, "message.html", who, status_code=status, title=title, text=text)


def html_error(status: int, text: str) -> HTMLResponse:
    """A bare error page for when templates cannot be used."""
    import html

    return secure(HTMLResponse(f"<!doctype html><title>{status}</title><p>{html.escape(text)}</p>",
                               status_code=status))  # type: ignore[return-value]

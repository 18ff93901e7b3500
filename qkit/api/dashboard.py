"""The operator's dashboard at ``GET /`` of ``qkit serve`` (docs/http-api.md#dashboard): the pages that read.

Server-rendered HTML (Jinja2, :mod:`qkit.api.dashboard_views`), htmx for the
live parts (served from ``/static/``, no CDN), no build step.  Pages: the
queues overview (counts refreshed every few seconds through a fragment, and a
sparkline of what finished), the jobs list (filters, paging), a job (payload,
attempts with tracebacks, events, progress, ``explain``'s verdict), worker runs
(with their executed notebooks as HTML), schedules and limits.  The DLQ and the
actions are :mod:`qkit.api.dashboard_actions`; who may see what is
:mod:`qkit.api.dashboard_auth`.  Reads are the ledger's own
(:mod:`qkit.ledger.dashboard`, :mod:`qkit.ledger.overview`), run on a thread.
"""
from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from qkit.api.dashboard_auth import (Viewer, check_csrf, read_form, safe_next, same_origin, session_for, set_session,
                                     sign_in_possible, viewer)
from qkit.api.dashboard_actions import ACTION_ROUTES
from qkit.api.dashboard_views import (STATIC_DIR, cell, ledger, page, queue_of, queue_param, render, secure,
                                      signed_in, sparkline)
from qkit.errors import BadInput, NotFound
from qkit.ledger import utcnow
from qkit.model import STATUSES, check_name
from qkit.text import clip

#: jobs per page of the jobs list
PAGE_SIZE = 50
#: the sparkline: jobs finished per minute over this many minutes (this one included), re-read this often
SPARK_MINUTES = 30
SPARK_CACHE_SECONDS = 20.0


def time_param(text: str, what: str) -> datetime | None:
    """'15m', '2h', '7d' (that long ago) or an ISO 8601 time; '' -> None."""
    from qkit.ops.retention import parse_age
    from qkit.utc import as_utc

    text = text.strip()
    if not text:
        return None
    if text[-1:].lower() in "smhdw" and text[:-1].replace(".", "", 1).strip().isdigit():
        return utcnow() - parse_age(text)
    try:
        return as_utc(text)
    except ValueError:
        raise BadInput(f"{what} {clip(text, 40)!r} is not like 15m, 2h, 7d or 2025-01-31T12:00") from None


def id_param(text: str, what: str) -> int | None:
    """A job or run id from the query string ('' -> None)."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 18:
        raise BadInput(f"{what} must be an id")
    return int(text)


def plain(value: Any) -> Any:
    """A schedule or limit as a dict, whatever shape its module returns."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "_asdict"):
        return value._asdict()
    return value


# ---------------------------------------------------------------- overview
def finished_bins(request: Request, who: Viewer, now: datetime) -> dict[str, list[tuple[int, int]]]:
    """Per queue, (completed, failed) per minute of the last :data:`SPARK_MINUTES`, oldest first; read from the
    ledger at most every :data:`SPARK_CACHE_SECONDS` (it scans the jobs that finished lately)."""
    state = request.app.state
    if getattr(state, "dashboard_spark", None) is None:
        state.dashboard_spark = {}
    cache = state.dashboard_spark
    hit = cache.get(who.owner)
    if hit is None or time.monotonic() - hit[0] > SPARK_CACHE_SECONDS:
        first = now.replace(second=0, microsecond=0) - timedelta(minutes=SPARK_MINUTES - 1)
        minutes = [(first + timedelta(minutes=i)).strftime("%Y-%m-%d %H:%M") for i in range(SPARK_MINUTES)]
        per_minute = ledger(request).finished_per_minute(since=first, owner=who.owner)
        hit = (time.monotonic(), {q: [m.get(minute, (0, 0)) for minute in minutes] for q, m in per_minute.items()})
        cache[who.owner] = hit
    return hit[1]


def overview_data(request: Request, who: Viewer) -> dict[str, Any]:
    now = utcnow()
    queues = ledger(request).queue_overview(now, owner=who.owner)
    bins = finished_bins(request, who, now)
    rows = []
    for q in queues:
        c = q["counts"]
        done = c.get("completed", 0) + c.get("failed", 0)
        rows.append({**q, "name": q["queue"], "total": sum(c.values()),
                     "success_rate": c.get("completed", 0) / done if done else None,
                     "spark": sparkline(bins.get(q["queue"], [(0, 0)] * SPARK_MINUTES), minutes=SPARK_MINUTES)})
    return {"queues": rows, "served": request.app.state.queue.name, "updated": now}


@page
async def overview(request: Request) -> Response:
    """GET /: every queue's counts, live."""
    who = signed_in(request)
    data = await run_in_threadpool(overview_data, request, who)
    return render(request, "overview.html", who, title="qkit: queues", **data)


@page
async def overview_fragment(request: Request) -> Response:
    """GET /fragments/queues: the overview's table alone (htmx swaps it in every few seconds)."""
    who = signed_in(request)
    data = await run_in_threadpool(overview_data, request, who)
    return render(request, "_queues.html", who, **data)


# ---------------------------------------------------------------- jobs
@page
async def jobs_list(request: Request) -> Response:
    """GET /jobs?queue=&status=&type=&since=&until=&before=: newest first, a page at a time."""
    who = signed_in(request)
    p = request.query_params
    status = p.get("status", "").strip() or None
    if status is not None and status not in STATUSES:
        raise BadInput(f"status {clip(status, 20)!r} is not one of {', '.join(STATUSES)}")
    job_type = p.get("type", "").strip() or None
    if job_type is not None:
        check_name(job_type, "type")
    before = id_param(p.get("before", ""), "before")
    filters = {"queue": queue_param(request), "status": status, "type": job_type,
               "since": time_param(p.get("since", ""), "since"), "until": time_param(p.get("until", ""), "until")}

    def run() -> tuple[list[dict[str, Any]], list[str]]:
        led = ledger(request)
        rows = led.find_jobs(**filters, owner=who.owner, before_id=before, limit=PAGE_SIZE + 1)
        names = led.queue_names() if who.owner is None else [q["queue"] for q in led.queue_overview(owner=who.owner)]
        return rows, names

    rows, queues = await run_in_threadpool(run)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    form = {k: p.get(k, "") for k in ("queue", "status", "type", "since", "until")}
    query = {k: v for k, v in form.items() if v}
    older = "/jobs?" + urlencode({**query, "before": rows[-1]["id"]}) if more and rows else None
    newest = "/jobs?" + urlencode(query) if before else None
    return render(request, "jobs.html", who, title="qkit: jobs", jobs=rows, form=form, queues=queues,
                  statuses=STATUSES, older=older, newest=newest, filtered=bool(query))


def job_data(request: Request, who: Viewer, job_id: int) -> dict[str, Any]:
    from qkit.ops.explain import explain

    led = ledger(request)
    job = led.job_row(job_id)
    if job is None or (who.owner is not None and job.get("owner") != who.owner):
        raise NotFound(f"no job {job_id}")
    verdict, findings, why_not = None, [], None
    try:
        exp = explain(queue_of(request, job["queue"]), job_id)
        verdict, findings, attempts, events = exp.verdict, exp.findings, exp.attempts, exp.events
    except Exception as exc:  # noqa: BLE001 - Redis down: the ledger's records still show, without a verdict
        why_not = f"explain is not available now ({type(exc).__name__}); the ledger's records follow"
        attempts, events = led.attempts(job_id), led.events(job_id)
    return {"job": job, "attempts": attempts, "events": events, "verdict": verdict, "findings": findings,
            "why_not": why_not, "can_cancel": job["status"] == "pending" or job["status"] == "processing"}


@page
async def job_page(request: Request) -> Response:
    """GET /jobs/{id}: everything about one job."""
    who = signed_in(request)
    raw = request.path_params["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no job {clip(raw, 40)!r}")
    data = await run_in_threadpool(job_data, request, who, int(raw))
    return render(request, "job.html", who, title=f"qkit: job {raw}", **data)


# ---------------------------------------------------------------- runs and their notebooks
def notebook_path(run: dict[str, Any]) -> Path | None:
    """The executed notebook of a scheduled run (the runner records it in ``params.runner.output``)."""
    params = run.get("params") or {}
    runner = params.get("runner") if isinstance(params, dict) else None
    output = runner.get("output") if isinstance(runner, dict) else None
    if not isinstance(output, str) or not output.endswith(".ipynb"):
        return None
    return Path(output)


@page
async def runs_list(request: Request) -> Response:
    """GET /runs?queue=&before=: worker runs, newest first, with links to scheduled runs' notebooks."""
    who = signed_in(request, operator=True)
    queue = queue_param(request)
    before = id_param(request.query_params.get("before", ""), "before")
    rows = await run_in_threadpool(lambda: ledger(request).run_page(queue=queue, limit=PAGE_SIZE + 1,
                                                                    before_id=before))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    for r in rows:
        path = notebook_path(r)
        r["notebook"] = path is not None and path.is_file()
        end = r.get("finished_at")
        r["seconds"] = (end - r["started_at"]).total_seconds() if end and r.get("started_at") else None
    query = {"queue": queue} if queue else {}
    older = "/runs?" + urlencode({**query, "before": rows[-1]["id"]}) if more and rows else None
    return render(request, "runs.html", who, title="qkit: worker runs", runs=rows, queue=queue, older=older)


_RENDERED: dict[tuple[str, int, int], str] = {}


def notebook_html(path: Path) -> str:
    """The executed notebook as HTML (kept for the last few files, by path, size and time)."""
    from qkit.runs.reports import notebook_html as render_notebook

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _RENDERED:
        while len(_RENDERED) >= 8:
            _RENDERED.pop(next(iter(_RENDERED)))
        _RENDERED[key] = render_notebook(path)
    return _RENDERED[key]


@page
async def run_notebook(request: Request) -> Response:
    """GET /runs/{id}/notebook: the run's executed notebook, rendered by nbconvert, sandboxed."""
    signed_in(request, operator=True)
    raw = request.path_params["id"]
    run = await run_in_threadpool(lambda: ledger(request).run_row(int(raw))) if raw.isdigit() and len(raw) < 19 \
        else None
    path = notebook_path(run) if run else None
    if path is None or not path.is_file():
        raise NotFound(f"run {clip(raw, 40)!r} has no executed notebook here")
    body = await run_in_threadpool(notebook_html, path)
    # the notebook's own scripts never run, nothing is fetched from elsewhere: it is a document
    csp = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:"
    return secure(HTMLResponse(body, headers={"Content-Security-Policy": csp}))


# ---------------------------------------------------------------- schedules and limits
async def _listing(request: Request, what: str, title: str, fields: tuple[str, ...] | None = None) -> Response:
    """A queue's schedules or limits as a table: ``fields`` (default: every key the rows have)."""
    who = signed_in(request, operator=True)
    name = queue_param(request, request.app.state.queue.name)

    def run() -> list[dict[str, Any]] | None:
        q = queue_of(request, name)
        method = getattr(q, what, None)  # q.schedules() and q.limits() (docs/semantics.md)
        if method is None:
            return None
        found = method()
        if isinstance(found, Mapping):  # q.limits(): type -> {rate, per, concurrency}
            return [{"type": key, **plain(value)} for key, value in found.items()]
        return [plain(x) for x in found]

    rows = await run_in_threadpool(run)
    columns = list(fields or dict.fromkeys(k for r in rows or [] for k in r))
    cells = None if rows is None else [[cell(r.get(c)) for c in columns] for r in rows]
    return render(request, "listing.html", who, title=f"qkit: {title}", heading=title, what=what, queue=name,
                  rows=cells, columns=columns)


@page
async def schedules_page(request: Request) -> Response:
    """GET /schedules?queue=: the queue's recurring jobs (what ``GET /api/schedules`` shows: no payloads)."""
    from qkit.api.routes_schedules import FIELDS

    return await _listing(request, "schedules", "schedules", FIELDS)


@page
async def limits_page(request: Request) -> Response:
    """GET /limits?queue=: the queue's rate and concurrency limits, by job type."""
    return await _listing(request, "limits", "limits", ("type", "rate", "per", "concurrency"))


# ---------------------------------------------------------------- signing in and out
@page
async def login(request: Request) -> Response:
    """GET /login: the form; POST /login: a token opens a session (the token itself is never kept)."""
    target = safe_next(request.query_params.get("next"))
    if request.method != "POST":
        return render(request, "login.html", viewer(request), title="qkit: sign in", target=target, error=None,
                      possible=sign_in_possible())
    form = await read_form(request)
    target = safe_next(form.get("next"))
    token = form.get("token", "").strip().encode("utf-8")
    data = await run_in_threadpool(session_for, request, token) if token and same_origin(request) else None
    if data is None:
        return render(request, "login.html", None, status_code=401, title="qkit: sign in", target=target,
                      error="That token is not valid here.", possible=sign_in_possible())
    response = RedirectResponse(target, status_code=303)
    set_session(request, response, data)
    return secure(response)


@page
async def logout(request: Request) -> Response:
    """POST /logout: end the session (CSRF-checked like every action)."""
    await check_csrf(request)
    response = RedirectResponse("/login", status_code=303)
    set_session(request, response, None)
    return secure(response)


#: the dashboard's routes (``qkit.api.app.ROUTE_MODULES`` names this module)
ROUTES = [
    Route("/", overview, methods=["GET"]),
    Route("/fragments/queues", overview_fragment, methods=["GET"]),
    Route("/jobs", jobs_list, methods=["GET"]),
    Route("/jobs/{id}", job_page, methods=["GET"]),
    Route("/runs", runs_list, methods=["GET"]),
    Route("/runs/{id}/notebook", run_notebook, methods=["GET"]),
    Route("/schedules", schedules_page, methods=["GET"]),
    Route("/limits", limits_page, methods=["GET"]),
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    *ACTION_ROUTES,
    Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
]

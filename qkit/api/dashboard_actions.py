"""The dashboard's DLQ page and its actions: replay, purge (a dry-run count first) and cancel.

Every action is a POST checked by :func:`qkit.api.dashboard_auth.action`
(session, role, origin, CSRF token) and answered with a redirect to the page
it came from, which then says what happened (``?done=...&n=...``: a fixed set
of messages, so a link cannot make the page say anything else).  The work is
the queue's own (:meth:`Queue.replay`, :meth:`Queue.purge_dead`,
``Queue.cancel``); nothing here touches Redis or SQL.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from qkit.api.dashboard_auth import action, viewer
from qkit.api.dashboard_views import ledger, page, queue_of, queue_param, render, secure, signed_in
from qkit.api.errors import ApiError
from qkit.errors import BadInput, Conflict, NotFound
from qkit.model import check_name
from qkit.text import clip

_IDS = re.compile(r"[\s,]+")


def _back(path: str, **query: Any) -> Response:
    return secure(RedirectResponse(f"{path}?{urlencode(query)}", status_code=303))


def dlq_data(request: Request, name: str) -> dict[str, Any]:
    from qkit.ops.triage import group_rows

    q = queue_of(request, name)
    groups = group_rows(q)
    return {"groups": groups, "total": sum(g["jobs"] for g in groups), "queues": ledger(request).queue_names()}


@page
async def dlq_page(request: Request) -> Response:
    """GET /dlq?queue=: failed jobs grouped by error fingerprint and type."""
    who = signed_in(request, operator=True)
    name = queue_param(request, request.app.state.queue.name)
    data = await run_in_threadpool(dlq_data, request, name)
    return render(request, "dlq.html", who, title=f"qkit: DLQ of {name}", queue=name, **data)


def _form_queue(form: dict[str, str], request: Request) -> str:
    return check_name(form.get("queue", "").strip() or request.app.state.queue.name, "queue name")


def _ids(text: str) -> list[int]:
    parts = [p for p in _IDS.split(text.strip()) if p]
    if not parts or not all(p.isdigit() and len(p) < 19 for p in parts):
        raise BadInput("ids must be job ids separated by commas or spaces")
    return [int(p) for p in parts]


@page
async def dlq_replay(request: Request) -> Response:
    """POST /dlq/replay: ``fingerprint`` (a group's id), ``ids``, or ``all``; back to the DLQ page."""
    _, form = await action(request)
    name = _form_queue(form, request)

    def run() -> list[int]:
        q = queue_of(request, name)
        if form.get("fingerprint", "").strip():
            return q.replay_fingerprint(form["fingerprint"].strip())
        if form.get("ids", "").strip():
            return q.replay(_ids(form["ids"]))
        if form.get("all") == "1":
            return q.replay_all()
        raise BadInput("say what to replay: a fingerprint, ids, or all")

    done = await run_in_threadpool(run)
    return _back("/dlq", queue=name, done="replayed", n=len(done))


def _purge_pairs(request: Request, name: str, fingerprint: str, older_than: str) -> list[tuple[int, int]]:
    """(id, epoch) of what a purge would delete now (the dry run): the DLQ, or its jobs of one fingerprint
    group and/or that failed more than ``older_than`` ago (as ``qkit dlq purge --fingerprint --older-than``)."""
    from qkit.ops.retention import dlq_age
    from qkit.ops.triage import purge_selection

    return purge_selection(queue_of(request, name), fingerprint=fingerprint or None,
                           older_than=dlq_age(older_than) if older_than else None)


@page
async def dlq_purge(request: Request) -> Response:
    """GET /dlq/purge?queue=&fingerprint=&older_than=: the dry run (which jobs would go), with the form that
    confirms it; POST /dlq/purge: purge exactly the jobs the dry run counts now, if that is still ``expect``
    of them (each only in the epoch read: one replayed meanwhile stays)."""
    if request.method != "POST":
        who = signed_in(request, operator=True)
        if not who.can_act:
            raise ApiError(403, "this session may only read")
        name = queue_param(request, request.app.state.queue.name) or ""
        fingerprint = request.query_params.get("fingerprint", "").strip()
        older_than = request.query_params.get("older_than", "").strip()
        pairs = await run_in_threadpool(_purge_pairs, request, name, fingerprint, older_than)
        return render(request, "purge.html", who, title="qkit: purge the DLQ?", queue=name, fingerprint=fingerprint,
                      older_than=older_than, ids=[i for i, _ in pairs])
    _, form = await action(request)
    name = _form_queue(form, request)
    fingerprint, older_than = form.get("fingerprint", "").strip(), form.get("older_than", "").strip()
    expect = form.get("expect", "")

    def run() -> int:
        pairs = _purge_pairs(request, name, fingerprint, older_than)
        if str(len(pairs)) != expect:
            raise Conflict(f"the DLQ changed since the dry run: it now holds {len(pairs):,} such job(s), not "
                           f"{clip(expect, 12)}; look again before purging")
        return queue_of(request, name).purge_dead(pairs) if pairs else 0

    try:
        n = await run_in_threadpool(run)
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    return _back("/dlq", queue=name, done="purged", n=n)


# ---------------------------------------------------------------- one job
async def _job_action(request: Request, *, cancel: bool) -> tuple[int, dict[str, Any], str]:
    raw = request.path_params["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no job {clip(raw, 40)!r}")
    job_id = int(raw)
    job = await run_in_threadpool(lambda: ledger(request).job_row(job_id))
    who = viewer(request)
    if job is None or (who is not None and who.owner is not None and job.get("owner") != who.owner):
        raise NotFound(f"no job {job_id}")
    await action(request, job_owner=job.get("owner"), cancel=cancel)
    return job_id, job, job["queue"]


@page
async def job_cancel(request: Request) -> Response:
    """POST /jobs/{id}/cancel: a pending job is cancelled, a running one asked to stop."""
    job_id, job, name = await _job_action(request, cancel=True)

    def run() -> bool:
        q = queue_of(request, name)
        if not hasattr(q, "cancel"):
            raise ApiError(501, "this qkit cannot cancel jobs yet")
        return q.cancel(job_id)

    ok = await run_in_threadpool(run)
    done = "not_cancelled" if not ok else "cancel_requested" if job["status"] == "processing" else "cancelled"
    return _back(f"/jobs/{job_id}", done=done)


@page
async def job_replay(request: Request) -> Response:
    """POST /jobs/{id}/replay: a failed job goes back to pending."""
    job_id, _, name = await _job_action(request, cancel=False)
    done = await run_in_threadpool(lambda: queue_of(request, name).replay([job_id]))
    return _back(f"/jobs/{job_id}", done="replayed", n=len(done))


ACTION_ROUTES = [
    Route("/dlq", dlq_page, methods=["GET"]),
    Route("/dlq/replay", dlq_replay, methods=["POST"]),
    Route("/dlq/purge", dlq_purge, methods=["GET", "POST"]),
    Route("/jobs/{id}/cancel", job_cancel, methods=["POST"]),
    Route("/jobs/{id}/replay", job_replay, methods=["POST"]),
]

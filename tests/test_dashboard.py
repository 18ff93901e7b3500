"""The dashboard of ``qkit serve`` over plain HTTP: sign-in, sessions, every page, filters, CSRF and roles.

One real ``python -m qkit.cli serve`` on loopback over a fresh ``QKIT_HOME``
holding jobs that completed, failed (into the DLQ) and wait; the test process
shares the home (and so the embedded Redis and the ledger) to make jobs and to
check what an action did.  The browser's view is tests/test_dashboard_browser.py.
"""
from __future__ import annotations

import re
import secrets
import stat
from datetime import datetime, timezone

import httpx
import pytest

import qkit
from qkit.backends.embedded import EmbeddedServer
from dashboard_helpers import ADMIN, FAIL, PUBLIC_URL, READER, drain, queue, seed, server, sign_in  # noqa: F401
from services import serve_home


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("dash-home")
    seed(path, ok=60, failing=4)
    with qkit.connect(home=path) as q:
        q.enqueue("scheduled_publish", {"later": True}, delay=3600)
    with qkit.connect(queue="other", home=path) as q:
        q.enqueue("web_scraping", {"url": "https://other"})
    yield path
    EmbeddedServer(path).stop()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def ids_on(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<td class="n"><a href="/jobs/(\d+)">', html)]


def action_buttons(html: str) -> list[str]:
    """The labels of buttons and button links that act (replay, purge, cancel)."""
    found = re.findall(r'<button[^>]*>([^<]*)</button>|<a class="button[^"]*"[^>]*>([^<]*)</a>', html)
    return [a or b for a, b in found if re.match(r"(Replay|Purge|Cancel)", a or b)]


def failed_ids(q) -> list[int]:
    return sorted(j.id for j in q.dead())


# --------------------------------------------------------------------------- signing in
def test_pages_need_a_session(server):
    reply = httpx.get(f"{server.url}/jobs?status=failed")
    assert reply.status_code == 303 and reply.headers["location"] == "/login?next=%2Fjobs%3Fstatus%3Dfailed"
    live = httpx.get(f"{server.url}/fragments/queues", headers={"HX-Request": "true"})
    assert live.headers.get("hx-redirect") == "/login"  # a live part sends the whole page to the form
    assert httpx.post(f"{server.url}/dlq/replay", data={"all": "1"}).status_code == 401
    form = httpx.get(f"{server.url}/login")
    assert form.status_code == 200 and 'type="password"' in form.text
    assert "content-security-policy" in form.headers and "set-cookie" not in form.headers


def test_a_wrong_token_opens_nothing(server):
    for token in ("", "nope", ADMIN + "x", "ré-" + READER):
        reply = httpx.post(f"{server.url}/login", data={"token": token})
        assert reply.status_code == 401 and "not valid" in reply.text
        assert "set-cookie" not in reply.headers


def test_the_session_cookie_is_signed_httponly_strict_and_holds_no_token(server, home):
    reply = httpx.post(f"{server.url}/login", data={"token": ADMIN, "next": "//evil.example/"})
    assert reply.status_code == 303 and reply.headers["location"] == "/"  # no open redirect
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("qkit_session=")
    flags = {p.strip().lower() for p in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert ADMIN not in cookie
    key = home / "dashboard.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    value = cookie.split(";")[0].split("=", 1)[1]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.cookies.set("qkit_session", value)
        page = client.get("/")
        assert page.status_code == 200 and ADMIN not in page.text
        client.cookies.set("qkit_session", value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
        assert client.get("/").status_code == 303  # a tampered signature is no session


def test_a_session_ends_when_its_token_changes(server, home):
    with sign_in(server.url, ADMIN) as client:
        cookie = client.cookies["qkit_session"]
    other = serve_home(home, home.parent / "rotated.log", QKIT_API_TOKEN="rotated-" + secrets.token_hex(8))
    try:  # same home, so the same signing key: only the token differs
        reply = httpx.get(f"{other.url}/", cookies={"qkit_session": cookie})
        assert reply.status_code == 303 and reply.headers["location"].startswith("/login")
    finally:
        other.stop()


def test_forms_from_the_public_origin_behind_a_proxy_pass_and_lookalikes_do_not(server):
    with sign_in(server.url, READER) as client:
        token = csrf_of(client.get("/").text)
        for origin in ("https://jobs.example.test.evil.example", "http://jobs.example.test", "null"):
            assert client.post("/logout", data={"csrf": token}, headers={"Origin": origin}).status_code == 403
        reply = client.post("/logout", data={"csrf": token}, headers={"Origin": PUBLIC_URL.rstrip("/")})
        assert reply.status_code == 303


def test_sign_out_needs_the_csrf_token_and_ends_the_session(server):
    with sign_in(server.url, READER) as client:
        assert client.post("/logout", data={}).status_code == 403
        token = csrf_of(client.get("/").text)
        reply = client.post("/logout", data={"csrf": token})
        assert reply.status_code == 303
        assert client.get("/").status_code == 303


# --------------------------------------------------------------------------- pages
def test_every_page_answers_for_an_admin(server, queue):
    failed = failed_ids(queue)[0]
    with sign_in(server.url, ADMIN) as client:
        for path in ("/", "/fragments/queues", "/jobs", f"/jobs/{failed}", "/dlq", "/dlq?queue=other", "/runs",
                     "/schedules", "/limits", "/dlq/purge"):
            reply = client.get(path)
            assert reply.status_code == 200, (path, reply.text[-500:])
            assert reply.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in reply.headers["content-security-policy"]
            assert reply.headers["cache-control"] == "no-store"
            assert ADMIN not in reply.text and READER not in reply.text
            assert not re.search(r"<script[^>]*src=\"https?:", reply.text)  # nothing from a CDN
        js = client.get("/static/htmx.min.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "htmx" in js.text[:200]
        assert client.get("/jobs/99999999").status_code == 404
        assert client.get("/jobs/abc").status_code == 404
        assert client.get("/jobs?status=sideways").status_code == 422
        assert client.get("/jobs?since=yesterday-ish").status_code == 422
        assert client.get("/jobs?before=" + "9" * 25).status_code == 422  # not an id: no SQL overflow
        assert client.get("/jobs/" + "9" * 19).status_code == 404
        assert client.get("/runs?before=x").status_code == 422


def test_overview_counts_every_queue(server, queue):
    with sign_in(server.url, ADMIN) as client:
        html = client.get("/fragments/queues").text
    rows = dict(re.findall(r'<tr data-queue="([^"]+)">(.*?)</tr>', html, re.S))
    assert set(rows) >= {"default", "other"}
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r'<td class="n">(.*?)</td>', rows["default"],
                                                                       re.S)]
    counts = queue.ledger.status_counts("default")
    assert cells[:1] + cells[2:6] == [f"{counts['due']:,}", f"{counts['delayed']:,}", f"{counts['processing']:,}",
                                      f"{counts['completed']:,}", f"{counts['failed']:,}"]
    assert counts["delayed"] == 1 and counts["completed"] == 60
    assert "<svg class=\"spark\"" in rows["default"] and "completed" in rows["default"]


def test_filters_narrow_the_jobs_list_and_pages_go_back_in_time(server, queue):
    with sign_in(server.url, ADMIN) as client:
        everything = ids_on(client.get("/jobs").text)
        assert len(everything) == 50 and everything == sorted(everything, reverse=True)
        page = client.get("/jobs").text
        older = re.search(r'<a href="([^"]+)" rel="next">', page).group(1).replace("&amp;", "&")
        second = ids_on(client.get(older).text)
        assert second and max(second) < min(everything)
        failed = ids_on(client.get("/jobs?status=failed&queue=default").text)
        assert failed == sorted(failed_ids(queue), reverse=True)
        typed = ids_on(client.get("/jobs?type=scheduled_publish").text)
        assert len(typed) == 1 and queue.get(typed[0]).type == "scheduled_publish"
        other = ids_on(client.get("/jobs?queue=other").text)
        assert len(other) == 1 and queue.ledger.get(other[0]).queue == "other"
        assert ids_on(client.get("/jobs?since=2h").text)  # everything here is minutes old
        assert ids_on(client.get("/jobs?until=2000-01-01T00:00:00").text) == []
        assert ids_on(client.get("/jobs?since=1h&status=failed&type=web_scraping").text) == []


def test_the_job_page_shows_payload_traceback_events_and_the_verdict(server, queue):
    job_id = failed_ids(queue)[0]
    with sign_in(server.url, READER) as client:
        html = client.get(f"/jobs/{job_id}").text
    assert "Traceback (most recent call last)" in html and "SimulatedFailure" in html
    assert f"Job {job_id} failed and is in the DLQ" in html  # explain's verdict
    assert "&#34;fail_rate&#34;: 1.0" in html or '"fail_rate": 1.0' in html
    assert "retry_scheduled" in html and "dead" in html


def test_runs_link_a_scheduled_runs_notebook_rendered_as_html(server, home, tmp_path):
    import nbformat
    from qkit.runs.runrecord import RunRecord, open_record

    marker = "dashboard-notebook-" + secrets.token_hex(4)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('x')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=marker)]
    nb.cells = [cell]
    output = tmp_path / "worker-run.ipynb"
    nbformat.write(nb, output)
    rec = RunRecord(run_id="run-" + secrets.token_hex(4), queue="default", output=str(output),
                    started_at=datetime.now(timezone.utc).isoformat())
    open_record(rec, home)
    assert rec.ledger_error is None
    with sign_in(server.url, ADMIN) as client:
        runs = client.get("/runs").text
        link = re.search(rf'<a href="(/runs/\d+/notebook)">{rec.run_id}</a>', runs)
        assert link, runs[-2000:]
        page = client.get(link.group(1))
        assert page.status_code == 200 and marker in page.text
        assert page.headers["content-security-policy"].startswith("sandbox")
        assert client.get("/runs/99999999/notebook").status_code == 404


# --------------------------------------------------------------------------- actions, CSRF and roles
def test_actions_refuse_a_missing_wrong_or_foreign_csrf_token(server, queue):
    target = failed_ids(queue)[0]
    with sign_in(server.url, ADMIN) as client:
        token = csrf_of(client.get("/dlq").text)
        for data, headers in (({"ids": str(target)}, {}),
                              ({"ids": str(target), "csrf": "wrong"}, {}),
                              ({"ids": str(target), "csrf": token}, {"Origin": "http://evil.example"}),
                              ({"ids": str(target)}, {"X-CSRF-Token": token[:-1]})):
            reply = client.post("/dlq/replay", data=data, headers=headers)
            assert reply.status_code == 403, (data, headers, reply.text)
            assert "CSRF" in reply.text
        assert queue.get(target).status == "failed"
        assert client.post("/dlq/replay", json={"ids": [target], "csrf": token}).status_code == 415


def test_a_read_only_session_sees_no_action_and_a_post_gets_403(server, queue):
    target = failed_ids(queue)[0]
    with sign_in(server.url, READER) as client:
        for path in ("/", "/dlq", f"/jobs/{target}"):
            html = client.get(path).text
            forms = re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', html)
            assert forms == ["/logout"], (path, forms)
            assert not action_buttons(html), path
        assert "read-only" in html
        token = csrf_of(html)  # the sign-out form's: a valid token of this session
        for path, data in (("/dlq/replay", {"ids": str(target)}), ("/dlq/replay", {"all": "1"}),
                           ("/dlq/purge", {"expect": "1"}), (f"/jobs/{target}/replay", {}),
                           (f"/jobs/{target}/cancel", {})):
            reply = client.post(path, data={**data, "csrf": token})
            assert reply.status_code == 403, (path, reply.text)
        assert client.get("/dlq/purge").status_code == 403
    assert queue.get(target).status == "failed"
    with sign_in(server.url, ADMIN) as client:  # the same pages do show them to an admin
        assert {"Replay", "Purge all…"} <= {b.split(" ")[0] if b.startswith("Replay") else b
                                            for b in action_buttons(client.get("/dlq").text)}
        assert action_buttons(client.get(f"/jobs/{target}").text) == ["Replay"]


def test_replay_from_the_dlq_page(server, queue):
    group = failed_ids(queue)
    with sign_in(server.url, ADMIN) as client:
        html = client.get("/dlq").text
        fp = re.search(r'name="fingerprint" value="([0-9a-f]{10})"', html).group(1)
        reply = client.post("/dlq/replay", data={"csrf": csrf_of(html), "queue": "default", "fingerprint": fp})
        assert reply.status_code == 303 and "done=replayed" in reply.headers["location"]
        after = client.get(reply.headers["location"]).text
        assert f"Replayed {len(group)} job(s)" in after
    assert {queue.get(i).status for i in group} == {"pending"}
    drain(queue)  # they fail again: the DLQ is back for the tests after this one
    assert failed_ids(queue) == group


def test_purge_counts_first_and_refuses_when_the_dlq_changed(server, home):
    with qkit.connect(queue="purgeme", home=home, backoff_base=0.0) as q:
        q.enqueue_many([{"type": "web_scraping", "payload": {"i": i, **FAIL}, "max_attempts": 1} for i in range(3)]
                       + [{"type": "ai_text_generation", "payload": {"i": i, **FAIL}, "max_attempts": 1}
                          for i in range(2)])
        drain(q)
        dead = {j.id: j.type for j in q.dead()}
        assert len(dead) == 5
        with sign_in(server.url, ADMIN) as client:
            page = client.get("/dlq?queue=purgeme").text
            groups = dict(re.findall(r'data-fingerprint="([0-9a-f]{10})">\s*<h2><span class="count">(\d+)', page))
            scraping = next(fp for fp, n in groups.items() if n == "3")
            dry = client.get(f"/dlq/purge?queue=purgeme&fingerprint={scraping}").text
            assert "would delete <strong>3</strong>" in dry and 'name="expect" value="3"' in dry
            token = csrf_of(dry)
            form = {"csrf": token, "queue": "purgeme", "fingerprint": scraping}
            stale = client.post("/dlq/purge", data={**form, "expect": "2"})
            assert stale.status_code == 409 and "changed since the dry run" in stale.text
            assert len(failed_ids(q)) == 5
            done = client.post("/dlq/purge", data={**form, "expect": "3"})
            assert done.status_code == 303 and done.headers["location"] == "/dlq?queue=purgeme&done=purged&n=3"
            assert {dead[i] for i in failed_ids(q)} == {"ai_text_generation"} and len(failed_ids(q)) == 2
            old = client.get("/dlq/purge?queue=purgeme&older_than=1d").text
            assert "would delete <strong>0</strong>" in old and "failed more than 1d ago" in old
            assert client.get("/dlq/purge?queue=purgeme&older_than=soon").status_code == 422
            rest = client.get("/dlq/purge?queue=purgeme").text
            assert "would delete <strong>2</strong>" in rest
            assert client.post("/dlq/purge", data={"csrf": token, "queue": "purgeme", "expect": "2"}).status_code == 303
        assert failed_ids(q) == []


# --------------------------------------------------------------------------- the ledger's reads, on every backend
def test_the_dashboard_reads_on_sqlite_and_postgresql(q, setup):
    from datetime import timedelta

    from qkit.ledger import utcnow

    start = utcnow() - timedelta(minutes=1)
    q.enqueue_many([{"type": "web_scraping", "payload": {"i": i}} for i in range(3)])
    q.enqueue_many([{"type": "ai_text_generation", "payload": {"i": i, **FAIL}, "max_attempts": 1} for i in range(2)])
    later = q.enqueue("web_scraping", {"later": True}, delay=3600)
    owned = q.enqueue("web_scraping", {"mine": True}, delay=3600, owner="user_carol")
    drain(q)
    carol = [r for r in q.ledger.queue_overview(owner="user_carol") if r["queue"] == q.name]
    assert [(r["counts"]["pending"], r["delayed"], sum(r["counts"].values())) for r in carol] == [(1, 1, 1)]
    assert [j["id"] for j in q.ledger.find_jobs(owner="user_carol", queue=q.name)] == [owned]
    q.cancel(owned)
    idle = setup.connect(q.name + "-idle")  # no job: the ledger knows it by its (empty) burst alone
    assert idle.work(max_seconds=1).processed == 0
    listed = {r["queue"]: r for r in q.ledger.queue_overview()}
    assert sum(listed[idle.name]["counts"].values()) == 0 and not listed[idle.name]["paused"]
    assert listed[q.name]["counts"]["completed"] == 3 and not listed[q.name]["paused"]
    minutes = q.ledger.finished_per_minute(since=start)[q.name]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", m) for m in minutes)
    assert min(minutes) >= start.strftime("%Y-%m-%d %H:%M")
    assert tuple(map(sum, zip(*minutes.values()))) == (3, 2)
    assert q.ledger.finished_per_minute(since=utcnow() + timedelta(minutes=5)).get(q.name) is None
    failed = q.ledger.find_jobs(queue=q.name, status="failed")
    assert len(failed) == 2 and {j["type"] for j in failed} == {"ai_text_generation"}
    assert [j["id"] for j in q.ledger.find_jobs(queue=q.name, type="web_scraping", limit=2)][:2] == [owned, later]
    assert q.ledger.find_jobs(queue=q.name, until=start) == []
    page = q.ledger.find_jobs(queue=q.name, limit=2)
    rest = q.ledger.find_jobs(queue=q.name, before_id=page[-1]["id"])
    assert len(page) + len(rest) == 7 and max(j["id"] for j in rest) < min(j["id"] for j in page)
    assert "payload" not in page[0] and q.ledger.job_row(later)["payload"] == {"later": True}
    assert q.ledger.job_row(10**15) is None
    runs = q.ledger.run_page(queue=q.name)
    assert runs and q.ledger.run_row(runs[0]["id"])["queue"] == q.name


def test_cancel_from_the_job_page(server, queue):
    job = queue.enqueue("web_scraping", {"later": True}, delay=3600)
    with sign_in(server.url, ADMIN) as client:
        page = client.get(f"/jobs/{job}").text
        assert action_buttons(page) == ["Cancel job"]
        done = client.post(f"/jobs/{job}/cancel", data={"csrf": csrf_of(page)})
        assert done.status_code == 303 and done.headers["location"] == f"/jobs/{job}?done=cancelled"
        after = client.get(done.headers["location"]).text
        assert "Cancelled." in after and action_buttons(after) == []
        again = client.post(f"/jobs/{job}/cancel", data={"csrf": csrf_of(page)})
        assert again.headers["location"] == f"/jobs/{job}?done=not_cancelled"
    assert queue.get(job).status == "cancelled"


def test_the_schedules_page_lists_a_queues_schedules_without_payloads(server, queue):
    queue.schedule("nightly-report", "30 2 * * *", "scheduled_publish", {"secret_ish": "payload-marker"},
                   tz="Europe/Berlin")
    with sign_in(server.url, READER) as client:
        html = client.get("/schedules").text
    row = re.search(r"<tr><td>nightly-report</td>(.*?)</tr>", html, re.S)
    assert row, html[-2000:]
    cells = re.findall(r"<td>(.*?)</td>", row.group(1))
    assert cells[:3] == ["30 2 * * *", "Europe/Berlin", "scheduled_publish"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[6])  # next fire, UTC
    assert "payload-marker" not in html
    assert queue.unschedule("nightly-report")


@qkit.handler("dash_progress")
def _reports_progress(payload: dict) -> dict:
    qkit.current_job().progress(0.75, "three quarters of " + payload["what"])
    return {"done": payload["what"]}


def test_the_job_page_shows_progress_and_result(server, queue):
    job = queue.enqueue("dash_progress", {"what": "the files"})
    drain(queue)  # this process registered the handler: its burst runs it
    with sign_in(server.url, READER) as client:
        html = client.get(f"/jobs/{job}").text
    assert '<progress max="1" value="0.75">' in html and "three quarters of the files" in html
    assert "<h2>Result</h2>" in html and "&#34;done&#34;: &#34;the files&#34;" in html


def test_the_limits_page_lists_a_queues_limits(server, queue):
    queue.limit("web_scraping", rate=10, per=30, concurrency=2)
    queue.limit("dash_progress", concurrency=1)  # registered above
    try:
        with sign_in(server.url, READER) as client:
            html = client.get("/limits").text
        rows = {r[0]: r[1:] for r in (re.findall(r"<td>(.*?)</td>", row)
                                      for row in re.findall(r"<tr>(<td>.*?)</tr>", html, re.S))}
        assert rows == {"web_scraping": ["10", "30", "2"], "dash_progress": ["–", "60", "1"]}, html[-1500:]
    finally:
        queue.unlimit("web_scraping")
        queue.unlimit("dash_progress")


def test_the_overview_marks_a_paused_queue(server, home):
    with qkit.connect(queue="other", home=home) as q, sign_in(server.url, READER) as client:
        def row() -> str:
            html = client.get("/fragments/queues").text
            return dict(re.findall(r'<tr data-queue="([^"]+)">(.*?)</tr>', html, re.S))["other"]

        assert "paused" not in row()
        q.pause()
        try:
            assert '<span class="tag paused">paused</span>' in row()
        finally:
            q.resume()
        assert "paused" not in row()

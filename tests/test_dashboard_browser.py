"""The dashboard in a real browser: Playwright driving Debian's chromium against a real ``qkit serve`` on loopback.

What an operator does: the overview shows a new job's queue within 5 s of its
enqueue (htmx polling, no reload); a filter narrows the jobs list; a failed
job's page shows its traceback; replay from the DLQ page puts the job back to
pending; a read-only session sees no action button and its POST gets 403.  No
page logs a console error.  Screenshots go under the test's ``tmp_path``; their
paths are printed (``pytest -s`` or ``-rP`` shows them) and recorded as the
test's ``screenshots`` property (``--junitxml``).
"""
from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

import pytest

import qkit
from qkit.backends.embedded import EmbeddedServer
from dashboard_helpers import ADMIN, READER, drain, queue, seed, server  # noqa: F401 (fixtures)
from services import CHROMIUM, chromium


pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="Debian's chromium is not installed "
                                "(bash scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("dash-browser-home")
    seed(path, ok=20, failing=3)
    yield path
    EmbeddedServer(path).stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


class Session:
    """A browser context signed in with one token; collects console errors and screenshots."""

    def __init__(self, browser, url: str, token: str, shots: Path, record) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.shots = shots
        self.taken: list[str] = []
        self.record = record
        self.goto("/")
        assert "/login" in self.page.url
        self.page.fill("#token", token)
        self.page.click("form.login button[type=submit]")
        self.page.wait_for_url(f"{url}/")

    def goto(self, path: str) -> None:
        self.page.goto(self.url + path)

    def shot(self, name: str) -> None:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.taken.append(str(path))

    def close(self) -> None:
        self.context.close()
        for path in self.taken:
            print(f"screenshot: {path}")
        self.record("screenshots", " ".join(self.taken))
        assert not self.errors, self.errors


@pytest.fixture()
def admin(browser, server, tmp_path, record_property):
    s = Session(browser, server.url, ADMIN, tmp_path / "screenshots", record_property)
    yield s
    s.close()


@pytest.fixture()
def reader(browser, server, tmp_path, record_property):
    s = Session(browser, server.url, READER, tmp_path / "screenshots", record_property)
    yield s
    s.close()


def test_the_overview_shows_a_new_queue_within_5_s_of_an_enqueue(admin, home):
    name = "live-" + secrets.token_hex(3)
    row = admin.page.locator(f'tr[data-queue="{name}"]')
    assert row.count() == 0
    admin.shot("overview-before")
    with qkit.connect(queue=name, home=home) as q:
        q.enqueue("web_scraping", {"url": "https://new"})
        enqueued = time.monotonic()
    row.wait_for(timeout=5_000)  # no reload: the htmx poll brings it
    seen = time.monotonic() - enqueued
    assert seen < 5, seen
    cells = row.locator("td.n").all_inner_texts()
    assert cells[0] == "1"  # due
    assert "/fragments/queues" == admin.page.locator("#queues").get_attribute("hx-get")
    admin.shot("overview-live")


def test_a_filter_narrows_the_jobs_list(admin, queue):
    admin.goto("/jobs")
    rows = admin.page.locator("table.jobs tbody tr")
    everything = rows.count()
    admin.page.select_option("select[name=status]", "failed")
    admin.page.click("form.filters button[type=submit]")
    admin.page.wait_for_url(re.compile(r".*status=failed.*"))
    failed = admin.page.locator("table.jobs tbody tr")
    shown = {int(t) for t in failed.locator("td:first-child a").all_inner_texts()}
    assert shown == {j.id for j in queue.dead()} and 0 < len(shown) < everything
    assert set(failed.locator("span.status").all_inner_texts()) == {"failed"}
    admin.shot("jobs-failed")


def test_the_job_page_shows_a_traceback(admin, queue):
    job = queue.dead()[0]
    admin.goto(f"/jobs/{job.id}")
    last = admin.page.locator("details[open] pre.traceback")
    assert "Traceback (most recent call last)" in last.inner_text()
    assert "SimulatedFailure" in last.inner_text()
    assert "failed and is in the DLQ" in admin.page.locator("section.verdict").inner_text()
    admin.shot("job-traceback")


def test_replay_from_the_dlq_page_moves_the_job_to_pending(admin, queue):
    dead = sorted(j.id for j in queue.dead())
    assert dead
    admin.goto("/dlq")
    admin.shot("dlq-before")
    group = admin.page.locator("section.group").first
    group.get_by_role("button", name=re.compile(r"^Replay")).click()
    admin.page.locator("p.notice").wait_for()
    assert f"Replayed {len(dead)} job(s)" in admin.page.locator("p.notice").inner_text()
    assert {queue.get(i).status for i in dead} == {"pending"}
    assert "The DLQ is empty." in admin.page.content()
    admin.shot("dlq-replayed")
    drain(queue)  # they fail again, so the DLQ has them for the tests after this one
    assert sorted(j.id for j in queue.dead()) == dead


def test_a_read_only_session_sees_no_action_button_and_its_post_gets_403(reader, queue):
    job = queue.dead()[0]
    for path, name in (("/dlq", "reader-dlq"), (f"/jobs/{job.id}", "reader-job"), ("/", "reader-overview")):
        reader.goto(path)
        assert reader.page.locator("form[method=post]:not([action='/logout'])").count() == 0, path
        assert reader.page.get_by_role("button", name=re.compile("Replay|Purge|Cancel")).count() == 0, path
        assert reader.page.get_by_role("link", name=re.compile("Purge")).count() == 0, path
        reader.shot(name)
    assert reader.page.locator(".role").inner_text() == "read-only"
    # the session's own CSRF token (from the sign-out form), sent the way a form would: still 403
    token = reader.page.locator("form[action='/logout'] input[name=csrf]").get_attribute("value")
    reply = reader.context.request.post(f"{reader.url}/dlq/replay", form={"ids": str(job.id), "csrf": token},
                                        headers={"Origin": reader.url})
    assert reply.status == 403
    assert queue.get(job.id).status == "failed"

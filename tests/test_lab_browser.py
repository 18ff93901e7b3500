"""The analyst's JupyterLab, in a real browser: ``qkit lab`` + Playwright driving Debian's chromium.

``qkit lab`` starts on a free loopback port (token auth) over a copy of
``notebooks/`` and a temporary ``QKIT_HOME`` holding a drained batch.  The
browser opens ``retry_analysis`` and ``queue_monitor``, runs all cells,
changes a control of the control bar and sees the figures redrawn (the PNG
data and the caption change), turns queue_monitor's live mode on and off,
and saves screenshots under ``tests/output/lab/``.  No cell may fail and the
browser console may show no error.  At the end the server, its kernels and
the embedded Redis are stopped, and no process of theirs is left.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import qkit
from qkit.backends.embedded import EmbeddedServer
from qkit.analysis.notebook_helpers import seeded_batch
from services import CHROMIUM, chromium

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "output" / "lab"

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="Debian's chromium is not installed "
                                "(bash scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """(base URL, token, server process) of `qkit lab` on a copy of notebooks/ and a home with jobs."""
    base = tmp_path_factory.mktemp("lab")
    home = base / "home"
    with qkit.connect(queue="default", home=home, backoff_base=0.0) as q:
        q.enqueue_many(seeded_batch("mixed", 120, fail_rate=0.4, latency_ms=1, seed=11))
        q.enqueue_many(seeded_batch("web_scraping", 30, priority=5, fail_rate=0.2, latency_ms=1, seed=12))
        for _ in range(20):
            q.work(max_seconds=10)
            counts = q.ledger.status_counts(q.name)
            if counts["pending"] + counts["processing"] == 0:
                break
            time.sleep(0.05)
    folder = base / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "conftest.py"))
    settings = base / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell in the DOM (the default attaches only those in view), no autosave
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = base / "lab-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    (base / "lab-settings" / "@jupyterlab" / "docmanager-extension").mkdir(parents=True)
    (base / "lab-settings" / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings").write_text(
        json.dumps({"autosave": False}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QKIT_", "UPSTASH_"))}
    env.update(QKIT_HOME=str(home), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
               JUPYTERLAB_SETTINGS_DIR=str(base / "lab-settings"), JUPYTER_CONFIG_DIR=str(base / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(base / "jupyter-runtime"))
    log = open(base / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qkit.cli", "lab", "--port", "0", "--dir", str(folder)],
                            env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    line = proc.stdout.readline()  # the URL line, printed once the server listens
    match = re.search(r"(http://127\.0\.0\.1:\d+)/lab\?token=(\w+)", line)
    assert match, (line, (base / "lab.log").read_text()[-2000:])
    server = psutil.Process(proc.pid)
    yield match.group(1), match.group(2), server
    family = [server, *server.children(recursive=True)]
    proc.send_signal(signal.SIGTERM)  # qkit lab stops JupyterLab, which shuts its kernels down
    try:
        proc.wait(timeout=60)
    finally:
        log.close()
        EmbeddedServer(home).stop()
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.cmdline()[:4]) for p in alive]}"


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def open_notebook(browser, lab_server, name: str):
    url, token, _ = lab_server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    # a workspace of its own: only this notebook open (Lab restores the tabs of the default workspace)
    page.goto(f"{url}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    status = page.locator("#jp-main-statusbar")
    wait_for(lambda: "Python 3 (ipykernel) | Idle" in status.inner_text().replace("\n", " | "), timeout=120,
             what="the kernel to start")
    return page, errors


def run_all(page) -> None:
    page.locator(".jp-Notebook").first.click()  # the notebook has the focus the menu's commands act on
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    code = page.locator(".jp-Notebook .jp-CodeCell")
    n = code.count()
    deadline = time.monotonic() + 180
    while True:
        prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_inner_texts()
        done = [p for p in prompts if re.search(r"\[\d+\]", p)]
        if len(done) == n and page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count():
            return
        assert time.monotonic() < deadline, prompts
        time.sleep(0.5)


def no_cell_error(page) -> None:
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert errors.count() == 0, errors.all_inner_texts()


def figure_sources(page) -> list[str]:
    return page.locator(".widget-html img").evaluate_all("els => els.map(e => e.getAttribute('src'))")


def dropdown(page, label: str):
    return page.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile(f"^{label}$"))) \
        .locator("select")


def wait_for(check, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def shot(page, name: str) -> list[Path]:
    """The window (with the control bar at the top), then each figure area scrolled into view."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.locator(".widget-vbox").first.scroll_into_view_if_needed()
    paths = [OUTPUT / f"{name}.png"]
    page.screenshot(path=str(paths[0]))
    areas = page.locator(".widget-html", has=page.locator("img"))
    for i in range(areas.count()):
        paths.append(OUTPUT / f"{name}-{i + 1}.png")
        areas.nth(i).screenshot(path=str(paths[-1]))
    return paths


def test_retry_analysis_in_lab(browser, lab_server):
    page, errors = open_notebook(browser, lab_server, "retry_analysis")
    run_all(page)
    no_cell_error(page)
    before = figure_sources(page)
    assert len(before) == 4 and all(s.startswith("data:image/png;base64,") for s in before)
    assert page.locator(".widget-dropdown").count() == 4  # queue, window, type, priority
    shot(page, "retry_analysis")
    dropdown(page, "type").select_option("web_scraping")
    wait_for(lambda: figure_sources(page) != before, what="the figures to be redrawn")
    after = figure_sources(page)
    assert all(a != b for a, b in zip(after, before)), "every figure follows the type control"
    assert "type web_scraping" in page.locator(".widget-vbox .widget-html").first.inner_text()
    assert "web_scraping" in page.locator(".widget-html pre").first.inner_text()  # the overview line
    shot(page, "retry_analysis-web_scraping")
    no_cell_error(page)
    assert not errors, errors
    page.close()


def test_queue_monitor_in_lab_with_live_mode(browser, lab_server):
    page, errors = open_notebook(browser, lab_server, "queue_monitor")
    run_all(page)
    no_cell_error(page)
    before = figure_sources(page)
    assert len(before) == 4
    shot(page, "queue_monitor")
    dropdown(page, "priority").select_option("5")
    wait_for(lambda: figure_sources(page) != before, what="the figures to be redrawn")
    assert "priority 5" in page.locator(".widget-vbox .widget-html").first.inner_text()
    status = page.locator(".widget-vbox .widget-html").first
    live = page.locator(".widget-toggle-button", has_text="Live")
    live.click()
    wait_for(lambda: "live, every" in status.inner_text(), what="live mode")
    first = status.inner_text()
    wait_for(lambda: status.inner_text() != first, timeout=30, what="a live refresh")  # redrawn, new time
    # the kernel stays free while live: a new cell runs at once
    page.locator(".jp-Notebook .jp-CodeCell").last.click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.type("print('kernel free', controls.redraws)")
    page.keyboard.press("Shift+Enter")
    wait_for(lambda: "kernel free" in page.locator(".jp-OutputArea-output").last.inner_text(), timeout=30,
             what="a cell to run during live mode")
    shot(page, "queue_monitor-live")
    page.locator(".widget-toggle-button", has_text="Stop").click()
    wait_for(lambda: "live, every" not in status.inner_text(), what="live mode to stop")
    assert page.locator(".widget-toggle-button", has_text="Live").count() == 1
    no_cell_error(page)
    assert not errors, errors
    page.close()

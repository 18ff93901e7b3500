"""scheduled/run_worker.py and qkit.runs.runner: locks, run records, and how runs end.

Every runner here is a real process running papermill and a real kernel.
Tests synchronise on files the notebooks write, never on sleeps.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pytest

import qkit
from qkit import cli
from qkit.analysis import frames
from qkit.backends.embedded import EmbeddedServer
from qkit.runs.runner import (EXIT_LOCKED, LockBusy, QueueLock, new_run_id, read_sidecars, reserve_output)

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "scheduled" / "run_worker.py"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def wait_gone(pid: int, seconds: float = 15) -> bool:
    """Wait until ``pid`` has exited (a zombie counts as exited); True if it did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.02)
    return False


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists() or not path.read_text():
        assert proc.poll() is None, f"the runner ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    params = nbformat.v4.new_code_cell('queue: str = "default"  # queue\nrun_id: str = ""  # run id')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(s) for s in sources)]
    nbformat.write(nb, path)
    return path


BLOCK = """
import os, time
from pathlib import Path
Path(os.environ["QKIT_TEST_STARTED"]).write_text(str(os.getpid()))
release, deadline = Path(os.environ["QKIT_TEST_RELEASE"]), time.monotonic() + 120
while not release.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture
def env(tmp_path):
    """A fresh QKIT_HOME, and the environment runners get."""
    home = tmp_path / "home"
    e = {k: v for k, v in os.environ.items() if k not in (
        "QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_DATABASE_URL", "QKIT_HANDLERS")}
    e.update(QKIT_HOME=str(home), QKIT_TEST_STARTED=str(tmp_path / "started"),
             QKIT_TEST_RELEASE=str(tmp_path / "release"), QKIT_BACKOFF_BASE="0")
    yield e
    (tmp_path / "release").touch()  # let any blocked kernel go
    EmbeddedServer(home).stop()


def runner(env: dict, *args: str, runs: Path, wait: bool = True):
    cmd = [sys.executable, str(RUNNER), "--runs-dir", str(runs), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def sidecars(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.glob("**/*.ipynb.json"))]


def ledger_runs(env: dict) -> list[dict]:
    with qkit.connect(home=env["QKIT_HOME"]) as q:
        return frames.runs(q).to_dict("records")


# ---------------------------------------------------------------- units
def test_outputs_are_unique_and_dated(tmp_path):
    now = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    a, b = reserve_output(tmp_path, now), reserve_output(tmp_path, now)
    assert a.relative_to(tmp_path).as_posix() == "2025/03/04/worker-20250304T050607Z.ipynb"
    assert re.fullmatch(r"worker-20250304T050607Z-[0-9a-f]{4}\.ipynb", b.name) and a != b
    assert re.fullmatch(r"20250304T050607Z-[0-9a-f]{6}", new_run_id(now))


def test_the_lock_names_its_holder(tmp_path):
    first = QueueLock(tmp_path, "q1").acquire({"pid": 4242, "run_id": "r1"})
    try:
        with pytest.raises(LockBusy, match=r"queue 'q1' \(pid 4242, run_id r1\)"):
            QueueLock(tmp_path, "q1").acquire({"pid": 1})
        QueueLock(tmp_path, "q2").acquire({"pid": 1}).release()  # another queue: its own lock
    finally:
        first.release()
    QueueLock(tmp_path, "q1").acquire({"pid": 2}).release()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_ledger_upgrade_fills_run_ids_from_params(tmp_path, request, dialect):
    """The schema upgrade adds the indexed worker_runs.run_id; rows of earlier runs get theirs from params.run_id."""
    from sqlalchemy import inspect, select, text

    from qkit.ledger import Ledger, SCHEMA_VERSION, worker_runs

    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.database("qkit_upgrade") if hasattr(server, "database") else server.url
    old = Ledger(url)
    old.init_schema()
    with old.engine.begin() as conn:  # back to a ledger of before the column
        conn.execute(text("DROP INDEX ix_worker_runs_run_id"))
        conn.execute(text("ALTER TABLE worker_runs DROP COLUMN run_id"))
        conn.execute(text("UPDATE qkit_schema SET version = 3"))  # v4 added worker_runs.run_id
        conn.execute(text("DELETE FROM worker_runs"))
        for params in ('{"run_id": "r-old"}', '{"via": "bearer"}', None):
            conn.execute(text("INSERT INTO worker_runs (worker, queue, started_at, processed, completed, retried, "
                              "failed, trigger, params, status) VALUES ('w', 'default', '2025-01-01 00:00:00', "
                              "0, 0, 0, 0, 'papermill', CAST(:params AS " + ("JSONB" if dialect == "postgresql" else "TEXT")
                              + "), 'ok')"), {"params": params})
    old.close()
    new = Ledger(url)
    try:
        assert new.init_schema() == SCHEMA_VERSION
        with new.read_engine.connect() as conn:
            assert [r for (r,) in conn.execute(select(worker_runs.c.run_id).order_by(worker_runs.c.id))] == \
                ["r-old", None, None]
            assert "ix_worker_runs_run_id" in {i["name"] for i in inspect(conn).get_indexes("worker_runs")}
    finally:
        new.close()


# ---------------------------------------------------------------- runs
def test_a_run_is_recorded_everywhere(env, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    with qkit.connect(home=env["QKIT_HOME"]) as q:
        q.enqueue_many([{"type": "scheduled_publish", "payload": {}} for _ in range(8)])
    done = runner(env, "--max-jobs", "3", runs=runs)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok - run ") and len(done.stdout.splitlines()) == 1
    (car,) = sidecars(runs)
    out = Path(car["output"])
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/worker-\d{8}T\d{6}Z(-[0-9a-f]{4})?\.ipynb",
                        out.relative_to(runs).as_posix())
    assert (car["status"], car["exit_code"], car["processed"], car["completed"]) == ("ok", 0, 3, 3)
    assert car["parameters"] == {"queue": "default", "run_id": car["run_id"], "max_jobs": 3}
    assert Path(car["log"]).is_file() and car["duration_s"] > 0
    executed = nbformat.read(out, as_version=4)
    assert executed.metadata.qkit["status"] == "ok"
    assert executed.metadata.papermill.parameters["run_id"] == car["run_id"]
    (row,) = ledger_runs(env)
    assert (row["trigger"], row["status"], row["processed"], row["run_id"]) == ("papermill", "ok", 3, car["run_id"])
    assert row["params"]["runner"]["status"] == "ok" and row["id"] in car["worker_run_ids"]
    # one record: the sidecar and the notebook's metadata are copies of the row, which is read back alone
    assert (car["worker_run_ids"], car["processed"]) == ([row["id"]], row["processed"])
    assert {k: executed.metadata.qkit[k] for k in ("run_id", "status", "worker_run_ids")} == \
        {k: car[k] for k in ("run_id", "status", "worker_run_ids")}
    assert read_sidecars(runs).loc[0, "run_id"] == car["run_id"]
    for path in runs.glob("**/*.ipynb.json"):
        path.unlink()
    with qkit.connect(home=env["QKIT_HOME"]) as q:
        merged = frames.runs(q)
    assert merged.loc[0, "run_status"] == "ok" and merged.loc[0, "output"] == str(out)
    assert (merged.loc[0, "exit_code"], merged.loc[0, "run_duration_s"]) == (0, car["duration_s"])
    monkeypatch.setenv("QKIT_HOME", env["QKIT_HOME"])
    assert cli.main(["runs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["params"]["run_id"] for r in listed if r["trigger"] == "papermill"] == [car["run_id"]]
    assert cli.main(["runs"]) == 0
    assert f"papermill\tok\t" in capsys.readouterr().out.replace(f"ok (exit 0) -> {out}", "papermill\tok\t")


def test_second_run_on_a_queue_refuses_with_one_line(env, tmp_path):
    runs = tmp_path / "runs"
    block = notebook(tmp_path / "block.ipynb", BLOCK)
    first = runner(env, "--notebook", str(block), runs=runs, wait=False)
    try:
        wait_for(tmp_path / "started", first)
        # the run's record exists from its start (its notebook never starts a burst)
        (running,) = ledger_runs(env)
        assert (running["trigger"], running["status"], running["run_status"]) == ("papermill", "running", "running")
        second = runner(env, runs=runs)
        assert second.returncode == EXIT_LOCKED
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "holds the lock of queue 'default'" in lines[0], second.stderr
        assert f"pid {first.pid}" in lines[0] and second.stdout == ""
        other = runner(env, "--queue", "other", runs=runs)  # another queue is not blocked
        assert other.returncode == 0, other.stderr
    finally:
        (tmp_path / "release").touch()
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert sorted(c["queue"] for c in sidecars(runs)) == ["default", "other"]
    (done,) = ledger_runs(env)
    assert (done["id"], done["status"], done["run_status"]) == (running["id"], "ok", "ok")


def test_a_killed_holder_does_not_keep_the_lock(env, tmp_path):
    runs = tmp_path / "runs"
    block = notebook(tmp_path / "block.ipynb", BLOCK)
    holder = runner(env, "--notebook", str(block), runs=runs, wait=False)
    kernel = int(wait_for(tmp_path / "started", holder))
    holder.kill()  # SIGKILL: no cleanup at all
    holder.communicate(timeout=30)
    after = runner(env, runs=runs)
    assert after.returncode == 0, after.stderr
    # papermill died with its runner (PR_SET_PDEATHSIG), and the kernel with papermill
    assert wait_gone(kernel, 20), "the killed run's kernel is still running"


def test_a_failing_notebook_is_a_failed_run(env, tmp_path):
    runs = tmp_path / "runs"
    bad = notebook(tmp_path / "bad.ipynb", "raise ValueError('boom from a scheduled test')")
    done = runner(env, "--notebook", str(bad), runs=runs)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "failed: ValueError: boom from a scheduled test" in lines[0], done.stderr
    (car,) = sidecars(runs)
    assert (car["status"], car["exit_code"], car["papermill_exit"]) == ("failed", 1, 1)
    assert Path(car["output"]).name.startswith("bad-")
    (row,) = ledger_runs(env)
    assert (row["trigger"], row["status"], row["run_id"]) == ("papermill", "failed", car["run_id"])
    assert "boom from a scheduled test" in row["error"]


def test_timeout_and_kernel_death_are_told_apart(env, tmp_path):
    runs = tmp_path / "runs"
    block = notebook(tmp_path / "block.ipynb", BLOCK)
    slow = runner(env, "--notebook", str(block), "--timeout", "3", runs=runs)
    assert slow.returncode == 124, slow.stderr
    dying = notebook(tmp_path / "dying.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    dead = runner(env, "--notebook", str(dying), runs=runs)
    assert dead.returncode == 1, dead.stderr
    by_nb = {Path(c["notebook"]).stem: c for c in sidecars(runs)}
    assert by_nb["block"]["status"] == "timeout" and by_nb["dying"]["status"] == "kernel_died"
    status = {r["run_id"]: r["status"] for r in ledger_runs(env)}
    assert status == {by_nb["block"]["run_id"]: "interrupted", by_nb["dying"]["run_id"]: "failed"}


def test_sigterm_stops_the_run_gracefully(env, tmp_path):
    runs = tmp_path / "runs"
    block = notebook(tmp_path / "block.ipynb", BLOCK)
    run = runner(env, "--notebook", str(block), runs=runs, wait=False)
    kernel = int(wait_for(tmp_path / "started", run))
    run.send_signal(signal.SIGTERM)  # as systemd stopping the unit would
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err
    (car,) = sidecars(runs)
    assert car["status"] == "interrupted" and "SIGTERM" in car["error"]
    # the kernel was interrupted (SIGINT), not left behind
    executed = nbformat.read(car["output"], as_version=4)
    errors = [o.ename for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == ["KeyboardInterrupt"]
    assert wait_gone(kernel, 20)


def test_bad_usage(env, tmp_path):
    done = runner(env, "--max-jobs", "0", runs=tmp_path / "runs")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    missing = runner(env, "--notebook", str(tmp_path / "nope.ipynb"), runs=tmp_path / "runs")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_the_main_job(env, tmp_path, monkeypatch, capsys):
    """python -m qkit.mainjob, small: enqueue through papermill, scheduled bursts until drained, HTML report."""
    from qkit import mainjob

    for name in ("QKIT_HOME", "QKIT_BACKOFF_BASE"):
        monkeypatch.setenv(name, env[name] if name == "QKIT_HOME" else "0.05")
    for name in ("PYTHONPATH", "MPLBACKEND"):  # mainjob sets them for its children
        monkeypatch.setenv(name, os.environ.get(name, ""))
    html = mainjob.run(n_jobs=30, fail_rate=0.5, latency_ms=0, reports=tmp_path / "reports",
                       runs_dir=tmp_path / "runs")
    out = capsys.readouterr().out
    assert f"report: {html}" in out and "enqueued 30 jobs" in out
    text = html.read_text()
    assert text.count('<img alt="Attempts to success') == 1 and text.count("data:image/png;base64") >= 4
    assert "application/vnd.qkit.record+json" not in text
    index = (tmp_path / "reports" / "index.html").read_text()  # the report's history, its runs as HTML
    assert html.parent.name.endswith("-seed42") and html.relative_to(tmp_path / "reports").as_posix() in index
    assert list(html.parent.glob("runs/*.html")) and "runs/worker-" in index
    cars = sidecars(tmp_path / "runs")
    assert cars and all(c["status"] == "ok" for c in cars)
    with qkit.connect(home=env["QKIT_HOME"]) as q:
        counts = q.ledger.status_counts(q.name)
    assert counts["pending"] + counts["processing"] == 0 and counts["completed"] + counts["failed"] == 30

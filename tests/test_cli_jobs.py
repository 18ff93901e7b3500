"""The CLI points of issue 15 other than the DLQ: `python -m qkit`, `qkit jobs`, ids found in any queue,
`runs` and `stats` for people, the unknown-type warning, `explain`'s advice, released jobs and retries
left waiting in the burst summary, progress lines off a terminal.

The CLI runs as a real subprocess (``python -m qkit``) against the embedded Redis and a SQLite ledger.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from sqlalchemy import select

from conftest import Setup, embedded_sqlite_setup, spawn_burst, wait_for
from qkit.ledger import worker_runs


def qkit_cli(setup: Setup | None, *args: str, env: dict | None = None, **extra: str) -> subprocess.CompletedProcess:
    """``python -m qkit ...`` off a terminal."""
    full = setup.env(**extra) if setup else dict(extra)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "qkit", *args], env=full, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def setup(embedded_home, tmp_path):
    yield embedded_sqlite_setup(embedded_home, tmp_path, "jobscli")


def one_line(out: subprocess.CompletedProcess, code: int, needle: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, (out.returncode, out.stderr)
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_python_dash_m_qkit_is_the_cli(setup):
    out = qkit_cli(setup, "--version")
    assert out.returncode == 0 and out.stdout.startswith("qkit, version")
    out = qkit_cli(setup, "enqueue", "web_scraping", "--queue", setup.queue, "--json")
    assert out.returncode == 0 and isinstance(json.loads(out.stdout)["id"], int), out.stderr


# ---------------------------------------------------------------- qkit jobs
def test_jobs_lists_with_a_header_and_filters(setup):
    q = setup.connect()
    done = q.enqueue("web_scraping", {})
    bad = q.enqueue("jobs_nobody_knows", {})
    q.work()
    later = q.enqueue("ai_text_generation", {}, delay=3600, priority=7)
    out = qkit_cli(setup, "jobs", "--queue", q.name)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split()[:5] == ["ID", "TYPE", "STATUS", "PRIORITY", "ATTEMPTS"] and "ERROR" in header
    assert [int(r.split()[0]) for r in rows] == [later, bad, done]  # newest first
    assert "UnknownJobType" in rows[1] and "due " in rows[0] and rows[0].split()[3] == "7"
    failed = json.loads(qkit_cli(setup, "jobs", "--queue", q.name, "--status", "failed", "--json").stdout)
    assert [r["id"] for r in failed] == [bad] and "payload" not in failed[0]
    typed = qkit_cli(setup, "jobs", "--queue", q.name, "--type", "web_scraping")
    assert [int(r.split()[0]) for r in typed.stdout.splitlines()[1:]] == [done]
    limited = qkit_cli(setup, "jobs", "--queue", q.name, "--limit", "1")
    assert len(limited.stdout.splitlines()) == 3 and "--limit" in limited.stdout.splitlines()[-1]
    assert qkit_cli(setup, "jobs", "--queue", "jobs-empty").stdout.strip() == "no jobs in queue 'jobs-empty'"


@pytest.mark.parametrize("args,needle", [
    (["jobs", "--status", "stuck"], "stuck"),
    (["jobs", "--type", "Bad Type!"], "job type"),
    (["jobs", "--limit", "0"], "limit"),
    (["job", "987654321"], "no job 987654321"),
    (["explain", "987654321"], "no job 987654321"),
    (["runs", "--limit", "x"], "limit"),
    (["work", "--progress-seconds", "0"], "progress-seconds"),
    (["enqueue", "web_scraping", "--queue", ""], "queue name ''"),  # an empty name is no default
    (["jobs", "--queue", ""], "queue name ''"),
    (["job", "1", "--queue", ""], "queue name ''"),
])
def test_bad_input_is_one_line_exit_2(setup, args, needle):
    one_line(qkit_cli(setup, *args), 2, needle)


# ---------------------------------------------------------------- ids across queues
def test_job_and_explain_find_the_job_in_whatever_queue_holds_it(setup):
    q = setup.connect("jobs-elsewhere")
    job_id = q.enqueue("web_scraping", {"url": "https://example.org"})
    out = qkit_cli(setup, "job", str(job_id))  # no --queue: not in 'default', found in 'jobs-elsewhere'
    assert out.returncode == 0 and out.stdout.startswith(f"job {job_id} [jobs-elsewhere] web_scraping"), out.stderr
    assert json.loads(qkit_cli(setup, "job", str(job_id), "--json").stdout)["queue"] == "jobs-elsewhere"
    exp = qkit_cli(setup, "explain", str(job_id), "--json")
    assert exp.returncode == 0 and json.loads(exp.stdout)["queue"] == "jobs-elsewhere", exp.stderr
    one_line(qkit_cli(setup, "job", str(job_id), "--queue", "default"), 2, "no job")  # an explicit queue is obeyed


def test_cancel_and_promote_find_the_job_in_whatever_queue_holds_it(setup):
    q = setup.connect("jobs-elsewhere2")
    later, other = q.enqueue("web_scraping", {}, delay=3600), q.enqueue("web_scraping", {}, delay=3600)
    promoted = qkit_cli(setup, "promote", str(later), "--json")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["queue"] == "jobs-elsewhere2"
    cancelled = qkit_cli(setup, "cancel", str(other), "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["queue"] == "jobs-elsewhere2", cancelled.stderr
    assert q.get(other).status == "cancelled"
    one_line(qkit_cli(setup, "cancel", "987654321"), 2, "no job 987654321")


# ---------------------------------------------------------------- runs, stats
def test_runs_have_a_header_duration_counts_and_trigger(setup):
    q = setup.connect(backoff_base=0)
    q.enqueue_many([{"type": "web_scraping", "payload": {}} for _ in range(3)]
                   + [{"type": "jobs_nobody_knows", "payload": {}}])
    work = qkit_cli(setup, "work", "--queue", q.name, "--json")
    run_id = json.loads(work.stdout)["run_id"]
    out = qkit_cli(setup, "runs", "--queue", q.name)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[:10] == ["RUN", "STARTED", "(UTC)", "DURATION", "STATUS", "PROCESSED", "COMPLETED",
                                   "RETRIED", "FAILED", "RELEASED"] and "TRIGGER" in header
    cells = row.split()
    assert cells[0] == str(run_id) and re.fullmatch(r"\d+(\.\d)? m?s", " ".join(cells[3:5]))
    assert cells[5:11] == ["ok", "4", "3", "0", "1", "0"] and cells[11] == "cli"
    assert qkit_cli(setup, "runs", "--queue", "jobs-norun").stdout.strip() == "no runs yet in queue 'jobs-norun'"


def test_stats_are_for_people(setup):
    q = setup.connect()
    q.enqueue_many([{"type": "web_scraping", "payload": {}} for _ in range(3)]
                   + [{"type": "jobs_nobody_knows", "payload": {}}])
    q.work()
    out = qkit_cli(setup, "stats", "--queue", q.name)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "success rate   75.0%" in text and "0.75" not in text
    assert re.search(r"^completed\s+3\s+75\.0%", text, re.M) and re.search(r"^failed\s+1\s+25\.0%", text, re.M)
    assert re.search(r"^total\s+4\s*$", text, re.M)
    assert json.loads(qkit_cli(setup, "stats", "--queue", q.name, "--json").stdout)["success_rate"] == 0.75


def test_stats_with_redis_unreachable_is_a_one_line_warning_and_exit_1(tmp_path):
    env = {"QKIT_HOME": str(tmp_path), "QKIT_REDIS_URL": "redis://:s3cret-sentinel@127.0.0.1:1/0",
           "QKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}", "PATH": "/usr/bin:/bin"}
    out = qkit_cli(None, "stats", env=env)
    one_line(out, 1, "warning: no stats")
    assert "QKIT_REDIS_URL" in out.stderr and out.stdout == "" and "s3cret-sentinel" not in out.stderr


# ---------------------------------------------------------------- enqueue: types no worker knows
def test_enqueue_warns_for_a_type_no_worker_knows(setup):
    out = qkit_cli(setup, "enqueue", "jobs_typo_type", "--queue", setup.queue)
    assert out.returncode == 0 and out.stdout.strip().isdigit()  # still enqueued: a worker may know it later
    one_line(out, 0, "no worker has handled job type 'jobs_typo_type'")
    for known in (["enqueue", "web_scraping"],  # built in
                  ["enqueue", "record"]):  # in a module QKIT_HANDLERS names
        out = qkit_cli(setup, *known, "--queue", setup.queue, QKIT_HANDLERS="job_handlers")
        assert out.returncode == 0 and out.stderr == "", out.stderr


def test_a_type_some_worker_handled_is_known_from_the_ledger(setup, tmp_path):
    q = setup.connect()
    log = tmp_path / "log"
    q.enqueue("record", {"log": str(log)})
    burst = spawn_burst(setup, env={"QKIT_HANDLERS": "job_handlers"})  # a worker that has the handler
    assert burst.wait(120) == 0
    out = qkit_cli(setup, "enqueue", "record", "--payload", f'{{"log": "{log}"}}', "--queue", q.name)
    assert out.returncode == 0 and out.stderr == "", out.stderr  # no QKIT_HANDLERS here, but a worker ran it


def test_explain_does_not_advise_replaying_a_type_without_a_handler(setup):
    q = setup.connect()
    orphan = q.enqueue("jobs_nobody_knows", {})
    known = q.enqueue("web_scraping", {"simulate": {"fail_rate": 1.0}}, max_attempts=1)
    q.work()
    out = qkit_cli(setup, "explain", str(orphan))
    assert out.returncode == 0, out.stderr
    assert "qkit dlq replay" not in out.stdout and "register one" in out.stdout
    assert f"qkit dlq replay {known}" in qkit_cli(setup, "explain", str(known)).stdout


# ---------------------------------------------------------------- bursts
def test_released_jobs_are_counted_apart_from_retries(setup, tmp_path):
    q = setup.connect(lease_seconds=30)
    log, release = tmp_path / "log", tmp_path / "release"
    q.enqueue("record", {"log": str(log), "wait_for": str(release)}, priority=5)
    q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(5)])
    out = tmp_path / "out"
    worker = spawn_burst(setup, env={"QKIT_HANDLERS": "job_handlers", "QKIT_LEASE_SECONDS": 30}, log=out)
    wait_for(lambda: log.exists() and log.read_text(), 60, "the first job to start")
    worker.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in out.read_text(), 60, "the burst to take the signal in")
    release.touch()
    worker.wait(60)
    with q.ledger.read_engine.connect() as conn:
        run = conn.execute(select(worker_runs).where(worker_runs.c.queue == q.name)).mappings().one()
    assert (run["status"], run["completed"], run["retried"], run["released"]) == ("interrupted", 1, 0, 5)
    row = qkit_cli(setup, "runs", "--queue", q.name).stdout.splitlines()[1].split()
    assert row[5:11] == ["interrupted", "1", "1", "0", "0", "5"]


def test_a_burst_says_how_many_retries_wait_and_when_the_next_is_due(setup):
    q = setup.connect()
    q.enqueue_many([{"type": "web_scraping", "payload": {"simulate": {"fail_rate": 1.0}}} for _ in range(2)])
    out = qkit_cli(setup, "work", "--queue", q.name, QKIT_BACKOFF_BASE="120", QKIT_BACKOFF_MAX="120")
    assert out.returncode == 0, out.stderr
    m = re.search(r"^2 waiting for retry, next due in (\d+\.\d) s$", out.stdout, re.M)
    assert m and 0 < float(m.group(1)) <= 120, out.stdout  # the back-off is jittered
    summary = json.loads(qkit_cli(setup, "work", "--queue", q.name, "--json").stdout)
    assert summary["processed"] == 0 and summary["waiting_retry"] == 2 and 0 < summary["next_retry_s"] <= 120
    nothing = qkit_cli(setup, "work", "--queue", "jobs-idle")
    assert "waiting for retry" not in nothing.stdout


def test_work_off_a_terminal_prints_progress_lines(setup):
    q = setup.connect()
    q.enqueue_many([{"type": "web_scraping", "payload": {"simulate": {"latency_ms": 200}}} for _ in range(12)])
    out = qkit_cli(setup, "work", "--queue", q.name, "--progress-seconds", "0.5")
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.startswith(f"qkit: burst on queue {q.name!r}: ")]
    assert len(lines) >= 2, out.stderr  # 12 x 200 ms: about 2.4 s of work
    counts = [int(re.search(r": (\d+) job\(s\) finished", x).group(1)) for x in lines]
    assert counts == sorted(counts) and counts[-1] <= 12
    assert "\r" not in out.stderr  # lines, not a bar rewritten in place


# ---------------------------------------------------------------- queues, duplicates
def test_queues_lists_every_queue_with_a_header(setup):
    a, b = setup.connect("jobs-qa"), setup.connect("jobs-qb")
    a.enqueue_many([{"type": "web_scraping", "payload": {}} for _ in range(3)])
    a.work(max_jobs=1)
    b.enqueue("web_scraping", {}, delay=3600)
    out = qkit_cli(setup, "queues")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split()[:6] == ["QUEUE", "DUE", "DELAYED", "PROCESSING", "COMPLETED", "FAILED"]
    cells = {r.split()[0]: r.split() for r in rows}
    assert cells["jobs-qa"][1:7] == ["2", "0", "0", "1", "0", "3"]
    assert cells["jobs-qb"][1:3] == ["0", "1"] and cells["jobs-qb"][-1] == "-"  # nothing due: no wait
    data = {r["queue"]: r for r in json.loads(qkit_cli(setup, "queues", "--json").stdout)}
    assert data["jobs-qa"]["counts"]["completed"] == 1 and data["jobs-qa"]["depth"] == 2
    assert data["jobs-qa"]["oldest_due_age_s"] >= 0 and data["jobs-qb"]["delayed"] == 1


def test_an_enqueue_that_matched_an_idempotency_key_says_it_was_a_duplicate(setup):
    first = qkit_cli(setup, "enqueue", "web_scraping", "--key", "order-77", "--queue", setup.queue)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    job_id = int(first.stdout)
    again = qkit_cli(setup, "enqueue", "web_scraping", "--key", "order-77", "--queue", setup.queue)
    assert again.returncode == 0 and int(again.stdout) == job_id  # the existing id, as scripts expect
    one_line(again, 0, f"duplicate: idempotency key 'order-77' is held by job {job_id} (pending)")
    as_json = qkit_cli(setup, "enqueue", "web_scraping", "--key", "order-77", "--queue", setup.queue, "--json")
    assert json.loads(as_json.stdout) == {"id": job_id, "duplicate": True}
    fresh = qkit_cli(setup, "enqueue", "web_scraping", "--key", "order-78", "--queue", setup.queue, "--json")
    assert json.loads(fresh.stdout)["duplicate"] is False
    assert len(setup.connect().jobs()) == 2

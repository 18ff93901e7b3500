"""Handler-directed outcomes (qkit.Retry, qkit.Permanent, a 429/503 Retry-After) and progress reports,
end to end on every backend, against a real local HTTP server (docs/semantics.md#handler-outcomes)."""
from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
from sqlalchemy import select, text

import qkit
from conftest import wait_for
from http_upstream import Reply, Upstream
from qkit.ledger import job_attempts, job_events
from qkit.ops.explain import explain
from test_cli import qkit_cli


@qkit.handler("outcome_http", timeout=30)
def outcome_http(payload: dict) -> dict:
    """Calls the upstream; raises httpx.HTTPStatusError on a 4xx/5xx (raise_for_status)."""
    response = httpx.post(payload["url"], json={"n": 1}, timeout=10)
    response.raise_for_status()
    return {"status": response.status_code}


@qkit.handler("outcome_permanent", timeout=30)
def outcome_permanent(payload: dict) -> None:
    raise qkit.Permanent("the prompt violates the content policy")


@qkit.handler("outcome_retry", timeout=30)
def outcome_retry(payload: dict) -> dict:
    if qkit.current_job().attempt < payload.get("succeed_at", 99):
        raise qkit.Retry(after=payload["after"], reason="quota window")
    return {"ok": True}


PROGRESS_GATE = threading.Event()
PROGRESS_STATEMENTS: list[int] = []


@qkit.handler("outcome_progress", timeout=60)
def outcome_progress(payload: dict) -> dict:
    job = qkit.current_job()
    job.progress(0.25, "quarter")
    if payload.get("wait"):
        assert PROGRESS_GATE.wait(60), "the test never opened the gate"
    job.progress(0.75, "three quarters")
    job.progress(1.0, payload.get("note", "done"))
    return {"ok": True}


@qkit.handler("outcome_chatty", timeout=60)
def outcome_chatty(payload: dict) -> dict:
    """1,000 progress reports in about half a second: the ledger sees at most a write or two."""
    ledger = payload_ledger[0]
    before = ledger.statements
    for i in range(1000):
        qkit.current_job().progress(i / 1000, f"step {i}")
        if i % 100 == 0:
            time.sleep(0.05)
    PROGRESS_STATEMENTS.append(ledger.statements - before)
    return None


payload_ledger: list = []


@qkit.handler("outcome_progress_retry", timeout=60)
def outcome_progress_retry(payload: dict) -> dict:
    job = qkit.current_job()
    if job.attempt == 1:
        job.progress(0.5, "half")
        raise qkit.Retry(after=0)
    assert PROGRESS_GATE.wait(60), "the test never opened the gate"
    job.progress(1.0, "second attempt done")
    return {}


def attempts_of(q: qkit.Queue, job_id: int) -> list[dict]:
    with q.ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(job_attempts).where(job_attempts.c.job_id == job_id)
                                              .order_by(job_attempts.c.attempt)).mappings()]


def events_of(q: qkit.Queue, job_id: int, name: str) -> list[dict]:
    with q.ledger.read_engine.connect() as conn:
        rows = conn.execute(select(job_events).where(job_events.c.job_id == job_id, job_events.c.event == name)
                            .order_by(job_events.c.id)).mappings()
        return [dict(r, detail=json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"])
                for r in rows]


def test_429_retry_after_2_retries_no_sooner_than_2_s(q):
    """The queue's back-off is 0 (retry at once): only the server's Retry-After can hold the retry back."""
    with Upstream() as up:
        up.script("/v1/chat", Reply(429, {"error": "rate limited"}, headers={"Retry-After": "2"}),
                  Reply(200, {"ok": True}))
        job_id = q.enqueue("outcome_http", {"url": up.url + "/v1/chat"}, max_attempts=3)
        summary = q.work(max_seconds=30)
        calls = up.requests("/v1/chat")
    assert summary.completed == 1 and summary.retried == 1
    first, second = attempts_of(q, job_id)
    assert first["outcome"] == "failed" and first["retry_after_ms"] == 2000
    assert "429" in first["error"] and second["outcome"] == "completed" and second["retry_after_ms"] is None
    # on the ledger's attempt times (Redis's clock): the retry started no sooner than 2 s after the 429
    assert (second["started_at"] - first["finished_at"]).total_seconds() >= 2.0
    assert len(calls) == 2 and calls[1].at - calls[0].at >= 2.0
    (scheduled,) = events_of(q, job_id, "retry_scheduled")
    assert scheduled["detail"]["delay_s"] == 2.0 and scheduled["detail"]["retry_after_s"] == 2.0
    exp = explain(q, job_id)
    assert "asked to retry after 2 s" in exp.verdict
    assert "(the handler asked to retry after 2 s)" in str(exp)  # the attempt's line in `qkit explain`


def test_503_retry_after_is_capped_by_backoff_max(setup):
    q = setup.connect(backoff_base=0, backoff_max=1)
    with Upstream() as up:
        up.script("/busy", Reply(503, "maintenance", headers={"Retry-After": "3600"}), Reply(200, {"ok": True}))
        job_id = q.enqueue("outcome_http", {"url": up.url + "/busy"}, max_attempts=2)
        t0 = time.monotonic()
        summary = q.work(max_seconds=30)
    assert summary.completed == 1 and time.monotonic() - t0 < 20
    first, second = attempts_of(q, job_id)
    assert first["retry_after_ms"] == 3_600_000  # what the server asked for
    (scheduled,) = events_of(q, job_id, "retry_scheduled")
    assert scheduled["detail"]["delay_s"] == 1.0  # what it got: QKIT_BACKOFF_MAX
    assert (second["started_at"] - first["finished_at"]).total_seconds() >= 1.0
    assert "capped" in explain(q, job_id).verdict


def test_500_takes_the_backoff_not_a_retry_after(q):
    with Upstream() as up:
        up.script("/boom", Reply(500, "oops", headers={"Retry-After": "30"}), Reply(200, {"ok": True}))
        job_id = q.enqueue("outcome_http", {"url": up.url + "/boom"}, max_attempts=2)
        t0 = time.monotonic()
        assert q.work(max_seconds=30).completed == 1
    assert time.monotonic() - t0 < 10  # base 0: retried at once, the 500's Retry-After ignored
    assert [a["retry_after_ms"] for a in attempts_of(q, job_id)] == [None, None]


def test_permanent_goes_to_the_dlq_after_one_attempt(q):
    job_id = q.enqueue("outcome_permanent", {}, max_attempts=5)
    summary = q.work(max_seconds=5)
    assert (summary.failed, summary.retried) == (1, 0)
    job = q.get(job_id)
    assert job.status == "failed" and job.attempts == 1
    assert job.error.startswith("Permanent: the prompt violates the content policy")
    assert [j.id for j in q.dead()] == [job_id]
    (attempt,) = attempts_of(q, job_id)
    assert attempt["outcome"] == "failed" and attempt["retry_after_ms"] is None
    (failed,) = events_of(q, job_id, "failed")
    assert failed["detail"]["reason"] == "permanent"
    verdict = explain(q, job_id).verdict
    assert "permanent error: Permanent: the prompt violates" in verdict and "not retried" in verdict


def test_retry_after_is_respected_and_bounded_by_max_attempts(q):
    ok_id = q.enqueue("outcome_retry", {"after": 1.5, "succeed_at": 2}, max_attempts=3)
    dead_id = q.enqueue("outcome_retry", {"after": 0.2}, max_attempts=2)
    q.work(max_seconds=30)
    first, second = attempts_of(q, ok_id)
    assert first["retry_after_ms"] == 1500 and second["outcome"] == "completed"
    assert (second["started_at"] - first["finished_at"]).total_seconds() >= 1.5
    assert first["error"].startswith("Retry: the handler asked to retry after 1.5 s: quota window")
    job = q.get(dead_id)
    assert job.status == "failed" and job.attempts == 2  # a Retry still spends an attempt
    (failed,) = events_of(q, dead_id, "failed")
    assert failed["detail"]["reason"] == "exhausted"
    assert "the handler asked to retry after 1.5 s" in explain(q, ok_id).verdict


def test_progress_visible_in_qkit_job_while_running_and_at_the_end(setup):
    q = setup.connect(backoff_base=0)
    PROGRESS_GATE.clear()
    job_id = q.enqueue("outcome_progress", {"wait": True, "note": "all 3 pages written"})
    burst = threading.Thread(target=q.work, kwargs={"max_seconds": 60})
    burst.start()
    try:
        wait_for(lambda: q.get(job_id).progress == 0.25, what="the first progress report in the ledger")
        running = qkit_cli(setup, "job", str(job_id), "--queue", q.name, "--json")
        assert running.returncode == 0, running.stderr
        data = json.loads(running.stdout)
        assert data["status"] == "processing"
        assert (data["progress"], data["progress_note"]) == (0.25, "quarter") and data["progress_at"]
        human = qkit_cli(setup, "job", str(job_id), "--queue", q.name)
        assert "progress: 25% - quarter" in human.stdout
    finally:
        PROGRESS_GATE.set()
        burst.join(60)
    # the last report (made right after a throttled one) is written when the attempt ends
    data = json.loads(qkit_cli(setup, "job", str(job_id), "--queue", q.name, "--json").stdout)
    assert (data["status"], data["progress"], data["progress_note"]) == ("completed", 1.0, "all 3 pages written")
    job = q.get(job_id)
    assert (job.progress, job.progress_note) == (1.0, "all 3 pages written")
    assert job.progress_at >= job.started_at


def test_progress_writes_are_throttled(q):
    payload_ledger[:] = [q.ledger]
    PROGRESS_STATEMENTS.clear()
    job_id = q.enqueue("outcome_chatty", {})
    assert q.work(max_seconds=30).completed == 1
    assert PROGRESS_STATEMENTS and PROGRESS_STATEMENTS[0] <= 2  # 1,000 reports in 0.5 s: one or two writes
    job = q.get(job_id)
    assert (job.progress, job.progress_note) == (0.999, "step 999")


def test_a_new_attempt_starts_without_the_last_ones_progress(q):
    PROGRESS_GATE.clear()
    job_id = q.enqueue("outcome_progress_retry", {}, max_attempts=2)
    burst = threading.Thread(target=q.work, kwargs={"max_seconds": 60})
    burst.start()
    try:
        job = wait_for(lambda: (lambda j: j if j.attempts == 2 and j.status == "processing" else None)(q.get(job_id)),
                       what="the second attempt running")
        assert job.progress is None and job.progress_note is None  # attempt 1's "half" is gone
    finally:
        PROGRESS_GATE.set()
        burst.join(60)
    assert (q.get(job_id).progress, q.get(job_id).progress_note) == (1.0, "second attempt done")


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), "50%", None, True])
def test_progress_refuses_bad_fractions(bad):
    from qkit.engine.handlers import JobContext

    ctx = JobContext(1, "t", 1, 3, "q", "w", reporter=lambda f, n: pytest.fail("a bad report was passed on"))
    with pytest.raises(ValueError, match="progress must be a number from 0 to 1"):
        ctx.progress(bad)
    with pytest.raises(TypeError, match="note must be a str"):
        JobContext(1, "t", 1, 3, "q", "w").progress(0.5, note=42)


def test_progress_note_is_capped():
    from qkit.engine.handlers import MAX_PROGRESS_NOTE, JobContext

    got = []
    JobContext(1, "t", 1, 3, "q", "w", reporter=lambda f, n: got.append((f, n))).progress(1, "x" * 5000)
    assert got == [(1.0, "x" * MAX_PROGRESS_NOTE)]


def test_a_failed_progress_write_logs_no_note(q, caplog):
    """A progress row the ledger refuses is dropped with one warning naming the exception's type only."""
    secret = "NOTE-WITH-JOB-DATA-7731"
    writer = q.ledger._event_writer()
    bad = text("UPDATE no_such_table SET progress_note = :b_note")
    with caplog.at_level(logging.WARNING, logger="qkit"):
        writer.submit([{"b_note": secret}], 0, statement=bad, quiet=True)
        assert writer.flush(30)
    assert "could not record 1 background row" in caplog.text
    assert secret not in caplog.text


def test_backoff_whatif_waits_the_named_delays(q):
    from qkit.analysis.policies import Policy
    from qkit.analysis.whatif import simulate_queue

    job_id = q.enqueue("outcome_retry", {"after": 1.0, "succeed_at": 2}, max_attempts=3)
    plain_id = q.enqueue("outcome_progress", {}, max_attempts=3)
    q.work(max_seconds=30)
    ran_ms = sum(a["duration_ms"] for a in attempts_of(q, job_id)) / 1000
    w = simulate_queue(q, [Policy("immediate", name="immediate"), Policy("fixed", base=0.1, cap=0.4, name="cap")])
    tts = w.outcomes.set_index(["policy", "job_id"])["tts_s"]
    # the immediate policy would have retried at once, but the handler asked for 1 s: the what-if waits it
    assert tts["immediate", job_id] == pytest.approx(ran_ms + 1.0, abs=1e-6)
    assert tts["cap", job_id] == pytest.approx(ran_ms + 0.4, abs=1e-6)  # capped by the policy's cap
    assert tts["immediate", plain_id] < 0.5
    assert any("named" in note for note in w.notes)


def test_retry_after_by_type_frame(setup):
    from qkit.analysis import frames

    q = setup.connect(backoff_base=0, backoff_max=1)
    with Upstream() as up:
        up.script("/limited", Reply(429, "slow down", headers={"Retry-After": "3"}), Reply(200, {"ok": True}))
        http_id = q.enqueue("outcome_http", {"url": up.url + "/limited"})
        q.enqueue("outcome_retry", {"after": 0.5, "succeed_at": 2})
        q.enqueue("outcome_progress", {})  # asked nothing: not counted
        q.work(max_seconds=30)
    df = frames.retry_after_by_type(q)
    rows = {(r.type, r.source): r for r in df.itertuples()}
    assert set(rows) == {("outcome_http", "Retry-After"), ("outcome_retry", "qkit.Retry")}
    http = rows["outcome_http", "Retry-After"]
    assert (http.attempts, http.jobs, http.min_s, http.max_s, http.over_cap) == (1, 1, 3.0, 3.0, 1)
    own = rows["outcome_retry", "qkit.Retry"]
    assert (own.attempts, own.jobs, own.mean_s, own.over_cap) == (1, 1, 0.5, 0)
    assert frames.retry_after_by_type(q, type="outcome_progress").empty
    assert q.get(http_id).status == "completed"


def test_explain_a_job_waiting_for_the_delay_its_handler_asked(q):
    job_id = q.enqueue("outcome_retry", {"after": 120.0}, max_attempts=3)
    assert q.work().retried == 1  # no time budget: the burst ends with the job delayed
    verdict = explain(q, job_id).verdict
    assert "is pending, delayed until" in verdict
    assert "by the delay asked for after attempt 1: the handler asked to retry after 120 s (Retry: " in verdict
    assert q.stats()["delayed"] == 1


LOCK_TAKEN = threading.Event()
CALLS_MEASURED = threading.Event()
CALL_SECONDS: list[float] = []


@qkit.handler("outcome_progress_locked", timeout=60)
def outcome_progress_locked(payload: dict) -> dict:
    assert LOCK_TAKEN.wait(60), "the test never took the lock"
    for i in range(6):
        t0 = time.perf_counter()
        qkit.current_job().progress((i + 1) / 6, f"step {i + 1}")
        CALL_SECONDS.append(time.perf_counter() - t0)
        time.sleep(0.3)  # past the throttle: the writer tries (and waits on the lock) meanwhile
    CALLS_MEASURED.set()
    return {}


def test_progress_never_waits_on_a_locked_ledger(embedded_home, tmp_path):
    """Another process holds SQLite's write lock while the handler reports: every call returns at once."""
    import sqlite3

    path = tmp_path / "ledger.sqlite3"
    q = qkit.connect(f"lock-{time.monotonic_ns()}", home=embedded_home, database_url=f"sqlite:///{path}")
    LOCK_TAKEN.clear(), CALLS_MEASURED.clear(), CALL_SECONDS.clear()
    job_id = q.enqueue("outcome_progress_locked", {})
    burst = threading.Thread(target=q.work, kwargs={"max_seconds": 60})
    burst.start()
    holder = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        wait_for(lambda: q.get(job_id).status == "processing", what="the job running")
        holder.execute("BEGIN IMMEDIATE")  # the ledger's write lock, as a long transaction elsewhere holds it
        LOCK_TAKEN.set()
        assert CALLS_MEASURED.wait(60)
    finally:
        LOCK_TAKEN.set()
        holder.execute("ROLLBACK") if holder.in_transaction else None
        holder.close()
        burst.join(60)
    assert len(CALL_SECONDS) == 6 and max(CALL_SECONDS) < 0.05, CALL_SECONDS
    job = q.get(job_id)
    assert (job.status, job.progress, job.progress_note) == ("completed", 1.0, "step 6")
    q.close()


@qkit.handler("outcome_late_reporter", timeout=0.5)
def outcome_late_reporter(payload: dict) -> None:
    time.sleep(1.5)  # abandoned at 0.5 s; then reports as if nothing happened
    qkit.current_job().progress(0.9, "late")


@qkit.handler("outcome_slow", timeout=30)
def outcome_slow(payload: dict) -> dict:
    time.sleep(3)  # keeps the burst alive past the abandoned handler's late report
    return {}


def test_an_abandoned_handlers_late_report_is_ignored(q):
    late = q.enqueue("outcome_late_reporter", {}, max_attempts=1, priority=1)
    q.enqueue("outcome_slow", {})
    summary = q.work(max_seconds=30)
    assert (summary.completed, summary.failed) == (1, 1)
    job = q.get(late)
    assert job.status == "failed" and job.error.startswith("HandlerTimeout")
    assert job.progress is None and job.progress_note is None  # its attempt had ended when it reported


def test_debug_job_shows_progress(q):
    from qkit.analysis import debug

    job_id = q.enqueue("outcome_progress", {"note": "finished here"})
    q.work()
    rep = debug.report(q, job_id)
    row = rep["job"].iloc[0]
    assert (row["progress"], row["progress_note"]) == (1.0, "finished here")
    again = debug.rerun(q, job_id)  # the in-process re-run collects the reports, writes nothing
    assert again.ok and again.progress == [(0.25, "quarter"), (0.75, "three quarters"), (1.0, "finished here")]
    assert again.to_frame().iloc[0]["progress_note"] == "finished here"

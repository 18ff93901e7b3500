"""The handler thread a burst keeps (qkit/engine/pool.py ``SerialRunner``): at concurrency 1 one thread runs
every batch of a burst, or of a ``--forever`` worker's life, instead of a thread started per batch (bench/README.md
"Latency"); a handler past its timeout is still abandoned with its thread, the rest going to a new one; SIGTERM
still drains the job in hand.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

import qkit
from conftest import embedded_sqlite_setup, spawn_burst, wait_for
from job_handlers import read_log
from qkit.ledger import worker_runs

_release = threading.Event()  # lets the test's hung handler end once the test is over


@qkit.handler("thread_of", timeout=30)
def thread_of(payload: dict) -> dict:
    """The OS id of the thread it ran on (Linux does not hand a thread's id to the next thread at once)."""
    return {"tid": threading.get_native_id()}


@qkit.handler("hang_until_released", timeout=0.5)
def hang_until_released(payload: dict) -> dict:
    """Hangs past its 0.5 s timeout (until the test ends), having said which thread it hangs on."""
    Path(payload["tid_file"]).write_text(str(threading.get_native_id()))
    _release.wait(60)
    return {}


@pytest.fixture
def setup(embedded_home: Path, tmp_path: Path, request: pytest.FixtureRequest):
    s = embedded_sqlite_setup(embedded_home, tmp_path, f"ht-{request.node.name[-20:]}")
    _release.clear()
    yield s
    _release.set()
    for q in s.opened:
        q.close()


def _handler_threads(besides: set[threading.Thread] = frozenset()) -> list[threading.Thread]:
    """Handler threads alive now, other than ``besides`` (those abandoned by earlier tests of this process)."""
    return [t for t in threading.enumerate() if t.name == "qkit-handler" and t.is_alive() and t not in besides]


def test_one_handler_thread_runs_every_batch_of_a_burst(setup):
    q = setup.connect(backoff_base=0)
    earlier = set(_handler_threads())
    now = q.enqueue_many([{"type": "thread_of", "payload": {}} for _ in range(20)])
    later = [q.enqueue("thread_of", {}, delay=d) for d in (0.3, 0.6)]  # batches of their own, after waits
    summary = q.work(max_seconds=30)
    assert summary.completed == 22 and summary.failed == 0
    tids = {q.get(i).result["tid"] for i in [*now, *later]}
    assert len(tids) == 1, f"{len(tids)} handler threads for one burst"
    assert tids != {threading.get_native_id()}  # not the burst's own thread: a hung handler must not hang it
    # the burst's end lets the kept thread go
    wait_for(lambda: not _handler_threads(earlier), 10, "the handler thread to end with its burst")


def test_a_hung_handler_still_times_out_and_its_thread_is_replaced(setup, tmp_path):
    q = setup.connect(backoff_base=0)
    earlier = set(_handler_threads())
    tid_file = tmp_path / "hung-tid"
    before = q.enqueue("thread_of", {})
    hung = q.enqueue("hang_until_released", {"tid_file": str(tid_file)}, max_attempts=1)
    after = q.enqueue_many([{"type": "thread_of", "payload": {}} for _ in range(3)])  # the same batch
    later = q.enqueue("thread_of", {}, delay=1.5)  # a later batch
    summary = q.work(max_seconds=30)
    job = q.get(hung)
    assert job.status == "failed" and "HandlerTimeout" in job.error
    assert summary.completed == 5 and summary.failed == 1
    hung_tid = int(tid_file.read_text())
    assert q.get(before).result["tid"] == hung_tid  # the thread that hung had run the job before it
    replaced = {q.get(i).result["tid"] for i in [*after, later]}
    assert len(replaced) == 1 and hung_tid not in replaced  # one new thread, kept for the next batch too
    # the abandoned thread is still in the handler; released, it ends instead of waiting for batches
    assert [t.native_id for t in _handler_threads(earlier)] == [hung_tid]
    _release.set()
    wait_for(lambda: not _handler_threads(earlier), 10, "the abandoned handler thread to end")


def test_sigterm_drains_the_job_on_a_forever_workers_kept_thread(setup, tmp_path):
    q = setup.connect(backoff_base=0, lease_seconds=30)
    log, release, out = tmp_path / "log", tmp_path / "release", tmp_path / "out"
    worker = spawn_burst(setup, "--forever", "--idle-seconds", "30", log=out,
                         env={"QKIT_HANDLERS": "job_handlers", "QKIT_LEASE_SECONDS": 30})
    try:
        first = q.enqueue("record", {"log": str(log)})
        wait_for(lambda: q.get(first).status == "completed", 60, "the first wake-up's job")
        # a second wake-up: its job runs on the thread kept from the first, and is in hand at SIGTERM
        second = q.enqueue("record", {"log": str(log), "wait_for": str(release)})
        wait_for(lambda: [e for e in read_log(log) if e[0] == "start" and e[1] == second], 30, "the second job")
        rest = q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(3)])
        worker.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in out.read_text(), 30, "the worker to take the signal in")
        release.touch()
        assert worker.wait(30) == -signal.SIGTERM  # drained, then stopped by the signal as its sender meant
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert q.get(second).status == "completed"
    assert all(q.get(i).status == "pending" for i in rest)  # not run, not held: released
    assert q.dispatch.inventory().leased == 0
    with q.ledger.read_engine.connect() as conn:
        runs = conn.execute(select(worker_runs.c.status, worker_runs.c.completed)
                            .where(worker_runs.c.queue == q.name)).all()
    assert runs == [("interrupted", 2)]

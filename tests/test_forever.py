"""`qkit work --forever` (docs/semantics.md#long-running-workers): a worker that sleeps until work is due.

On TCP Redis and the embedded server it sleeps subscribed to the queue's wake-up channel (push.lua
publishes there), so an idle worker sends no command at all; on Upstash, which has no push channel over
REST, it polls once per ``--idle-seconds``.  An enqueue wakes it at once, a delayed job runs when due, and
SIGTERM drains it as it drains a burst.
"""
from __future__ import annotations

import signal
import time

import redis

from sqlalchemy import select

from conftest import spawn_burst, wait_for
from qkit.ledger import worker_runs


def _commands_while(setup, q, request, seconds: float, only: tuple[str, ...] = ()) -> int:
    """Commands other than INFO the Redis behind the queue received in ``seconds`` (INFO is this probe's and
    the embedded server's watchdog's); for Upstash, the redis-server behind the local endpoint."""
    if setup.name == "embedded-sqlite":
        client = q.backend.client
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_server").url, decode_responses=True)
    def count() -> int:
        stats = client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items()
                   if k not in ("cmdstat_info", "info") and (not only or k.removeprefix("cmdstat_") in only))

    before = count()
    time.sleep(seconds)
    return count() - before


def test_forever_sleeps_idle_wakes_on_enqueue_runs_delayed_and_drains_on_sigterm(setup, q, tmp_path, request):
    idle = "0.5" if setup.name == "upstash-sqlite" else "30"
    worker = spawn_burst(setup, "--forever", "--idle-seconds", idle, env={"QKIT_HANDLERS": "job_handlers"},
                         log=tmp_path / "worker.out")
    try:
        log = tmp_path / "runs.log"
        first = q.enqueue("record", {"log": str(log)})
        wait_for(lambda: q.get(first).status == "completed", 60, "the first job")
        wait_for(lambda: q.ledger.running_runs(q.name), 10, "the worker's run row")

        # idle: subscribed, the worker sends nothing; polling (Upstash), one claim per --idle-seconds
        if setup.name == "upstash-sqlite":  # script calls (commandstats also counts the commands inside them)
            commands = _commands_while(setup, q, request, 3.0, only=("evalsha", "eval"))
            assert 2 <= commands <= 3.0 / 0.5 + 2, commands  # one claim call per poll
        else:
            assert _commands_while(setup, q, request, 3.0) == 0

        # an enqueue wakes it well before its 30 s idle timeout; so does a delayed job falling due
        t0 = time.monotonic()
        woken = q.enqueue("record", {"log": str(log)})
        wait_for(lambda: q.get(woken).status == "completed", 10, "the job enqueued while it slept")
        assert time.monotonic() - t0 < 10
        delayed = q.enqueue("record", {"log": str(log)}, delay=1.0)
        job = wait_for(lambda: (j := q.get(delayed)).status == "completed" and j, 20, "the delayed job")
        attempt = q.ledger.attempts(delayed)[0]
        assert attempt["started_at"] >= job.run_at  # not before it was due (both from Redis's clock)

        # SIGTERM while idle: it stops promptly, its run closed as interrupted, nothing left behind
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        with q.ledger.engine.connect() as conn:
            rows = conn.execute(select(worker_runs.c.status, worker_runs.c.completed)
                                .where(worker_runs.c.queue == q.name)).all()
        assert rows == [("interrupted", 3)], rows
        assert q.stats()["pending"] == 0 and q.stats()["processing"] == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


"""Faults on the Upstash HTTP path never double-claim or double-enqueue a job.

The local Upstash endpoint's :class:`~qkit.dev.upstash.FaultPlan` answers
chosen requests with a 5xx before or after running the command, hangs after
running it until the client times out, or drops the connection before or
after running it.  qkit's Upstash client never re-sends (``rest_retries=0``):
every fault reaches the caller as one ``BackendUnavailable`` line naming
``UPSTASH_REDIS_REST_URL``, and the outcome of the request is unknown.

How each caller recovers, and what these tests pin down:

* **enqueue**: the ledger row is committed before the Redis push, so a caller
  retries ``enqueue_many`` with the same idempotency keys: it gets the same
  ids, nothing is enqueued twice, and a push that never ran is redone by the
  next burst's drift check (:func:`qkit.ops.reconcile.repair_if_drifted`).
  Without keys a retry enqueues a second job, which is why keys are the rule.
  A job that already died before the retry still holds its key
  (docs/semantics.md#idempotency): the retry gets the failed job's id, it does not enqueue it again.
* **claim** whose answer is lost: the jobs are leased to a token that never
  learns of them; nobody else gets them until the lease expires, then a
  burst reclaims them; the ledger never saw that claim, so no attempt is lost.
* **settle** whose answer is lost: the ledger is already terminal; the lease
  expires and the reclaim drops the job without running it.  A retry whose
  settle was lost goes back to wait for its back-off (it is not run early).
* **renew** failing: the lease lapses, another worker reclaims the job
  (the first attempt is recorded ``lost``) and the first worker's late
  outcome is fenced off.
* **purge**: whichever of its two writes a fault leaves undone, the next
  burst brings Redis's DLQ back to the ledger's failed jobs.

Each test ends Jepsen-style: executions counted from a log the handlers
append to, attempts and events from the ledger, places from a Redis snapshot.
"""
from __future__ import annotations

import collections
import random
import secrets
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

import qkit
from conftest import wait_for
from qkit.backends.upstash import URL_VAR, UpstashBackend
from qkit.config import settings as resolve_settings
from qkit.errors import BackendUnavailable
from qkit.ledger import job_attempts, job_events, jobs, worker_runs
from qkit.lua import load_script

TOKEN = "faults-test-" + secrets.token_hex(8)
SCRIPT_NAMES = sorted(p.stem for p in (Path(qkit.__file__).parent / "lua").glob("*.lua")
                      if not p.stem.startswith("_"))
#: the client gives up on a request after this long (also how long a "timeout_after" costs)
CLIENT_TIMEOUT = 1.0
FAULTS_BEFORE = ("500_before", "500_json_before", "drop_before")  # the command did not run
FAULTS_AFTER = ("500_after", "drop_after", "timeout_after")  # the command ran; its answer is lost
ALL_FAULTS = FAULTS_BEFORE + FAULTS_AFTER


# --------------------------------------------------------------------------- handlers
_log_lock = threading.Lock()


def _log(payload: dict, what: str) -> None:
    ctx = qkit.current_job()
    with _log_lock, open(payload["log"], "a") as fh:
        fh.write(f"{what} {ctx.id} {ctx.attempt} {ctx.worker}\n")


@qkit.handler("fx-ok", timeout=20)
def _ok(payload: dict) -> dict:
    _log(payload, "start")
    if payload.get("ms"):
        time.sleep(payload["ms"] / 1000)  # a little work, so bursts overlap and leases get renewed
    _log(payload, "done")
    return {"ok": True}


@qkit.handler("fx-flaky", timeout=20)
def _flaky(payload: dict) -> dict:
    _log(payload, "start")
    if qkit.current_job().attempt == 1:
        raise RuntimeError("transient failure on the first attempt")
    _log(payload, "done")
    return {"ok": True}


@qkit.handler("fx-bad", timeout=20)
def _bad(payload: dict) -> None:
    _log(payload, "start")
    raise ValueError("this job always fails")


@qkit.handler("fx-gate", timeout=30)
def _gate(payload: dict) -> dict:
    """The first attempt waits for a release file (so a test controls when it ends)."""
    _log(payload, "start")
    if qkit.current_job().attempt == 1:
        deadline = time.monotonic() + 20
        while not Path(payload["gate"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    _log(payload, "done")
    return {"ok": True}


def read_log(path: Path) -> list[tuple[str, int, int, str]]:
    """(what, job id, attempt, worker) per handler log line."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        what, job_id, attempt, worker = line.split()
        rows.append((what, int(job_id), int(attempt), worker))
    return rows


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def faulty(module_redis, endpoint_on):
    """The endpoint whose FaultPlan the tests arm."""
    return endpoint_on(module_redis.url, TOKEN)


@pytest.fixture(scope="module")
def clean(module_redis, endpoint_on):
    """A second endpoint on the same Redis that never faults: another worker's healthy network path."""
    return endpoint_on(module_redis.url, TOKEN)


@pytest.fixture(autouse=True)
def fresh(module_redis, faulty) -> Iterator[None]:
    """Empty Redis with the scripts cached (so no NOSCRIPT round trip shifts the request order), no faults."""
    with module_redis.client() as r:
        r.flushall()
        for name in SCRIPT_NAMES:
            r.script_load(load_script(name).source)
    faults = faulty.app.state.faults
    faults.clear()
    faults.hang_seconds = 30.0
    yield
    faults.clear()  # a failed test must not leave faults armed for the next


def make_queue(endpoint, tmp_path: Path, name: str, *, lease: float = 1.0, backoff_base: float = 0.0,
               backoff_max: float = 0.2) -> qkit.Queue:
    """A queue on ``endpoint`` with a client timeout (``qkit.connect`` has no such option)."""
    settings = resolve_settings(upstash_url=endpoint.url, upstash_token=TOKEN, home=tmp_path,
                                database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", lease_seconds=lease,
                                backoff_base=backoff_base, backoff_max=backoff_max)
    return qkit.Queue(name, settings, backend=UpstashBackend(endpoint.url, TOKEN, timeout=CLIENT_TIMEOUT))


def assert_one_line_naming_url(exc: BaseException) -> None:
    message = str(exc)
    assert isinstance(exc, BackendUnavailable), repr(exc)
    assert "\n" not in message and URL_VAR in message and TOKEN not in message, message


# --------------------------------------------------------------------------- the ledger audit
def audit(q: qkit.Queue, log: Path, enqueued: set[int]) -> dict[str, int]:
    """Jepsen-style counts over the ledger, the handlers' log and Redis; returns totals."""
    with q.ledger.read_engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(
            jobs.c.id, jobs.c.type, jobs.c.status, jobs.c.attempts, jobs.c.epoch, jobs.c.idempotency_key,
            jobs.c.created_at, jobs.c.finished_at).where(jobs.c.queue == q.name))}
        attempts: dict[int, dict[int, str | None]] = collections.defaultdict(dict)
        for job_id, attempt, outcome in conn.execute(
                select(job_attempts.c.job_id, job_attempts.c.attempt, job_attempts.c.outcome)
                .where(job_attempts.c.job_id.in_(list(rows)))):
            assert attempt not in attempts[job_id], f"job {job_id}: two attempt rows numbered {attempt}"
            attempts[job_id][attempt] = outcome
        terminal_events = collections.Counter(conn.execute(
            select(job_events.c.job_id).where(job_events.c.job_id.in_(list(rows)),
                                              job_events.c.event.in_(("completed", "failed")))).scalars())
        runs = conn.execute(select(worker_runs.c.status, worker_runs.c.finished_at, worker_runs.c.error)
                            .where(worker_runs.c.queue == q.name)).all()
    started = collections.Counter((j, a) for what, j, a, _ in read_log(log) if what == "start")

    # no double enqueue: the ledger holds exactly the jobs the callers were given, and a key is held by
    # one job, failed or not (docs/semantics.md#idempotency): a retry after the first job died gets its id
    assert enqueued == set(rows), sorted(set(rows) - enqueued)
    by_key = collections.Counter(r.idempotency_key for r in rows.values() if r.idempotency_key is not None)
    assert all(n == 1 for n in by_key.values()), [k for k, n in by_key.items() if n > 1]
    totals = collections.Counter()
    for job_id, r in rows.items():
        outcomes = attempts[job_id]
        assert r.epoch == 0
        # every job ended, exactly once
        assert r.status in ("completed", "failed"), (job_id, r.status)
        assert terminal_events[job_id] == 1, (job_id, terminal_events[job_id])
        assert r.attempts == len(outcomes), (job_id, r.attempts, outcomes)
        assert sorted(outcomes) == list(range(1, len(outcomes) + 1)), (job_id, outcomes)
        assert None not in outcomes.values(), f"job {job_id}: an attempt was never closed: {outcomes}"
        completed = [a for a, o in outcomes.items() if o == "completed"]
        assert len(completed) == (1 if r.status == "completed" else 0), (job_id, outcomes)
        # no double claim: one (job, attempt) ran at most once, and only under an attempt the ledger opened
        ran = {a for (j, a) in started if j == job_id}
        assert all(started[(job_id, a)] == 1 for a in ran), (job_id, started)
        assert ran <= set(outcomes), (job_id, ran, outcomes)
        # an attempt recorded as having run (not lost) did run; a lost one may or may not have
        assert {a for a, o in outcomes.items() if o != "lost"} <= ran, (job_id, ran, outcomes)
        lost = [a for a, o in outcomes.items() if o == "lost"]
        if r.type == "fx-ok":
            # a job that never fails by itself: every extra execution is explained by a lost attempt
            assert len(ran) - 1 <= len(lost), (job_id, ran, outcomes)
            assert all(o == "lost" for a, o in outcomes.items() if a != max(outcomes)), outcomes
        totals["executions"] += len(ran)
        totals["lost"] += len(lost)
        totals[r.status] += 1
    # every burst closed its worker_runs row, also the ones a fault killed
    for status, finished_at, error in runs:
        assert finished_at is not None and status in ("ok", "failed"), (status, error)
        if status == "failed":
            assert URL_VAR in error and "BackendUnavailable" in error, error
    totals["bursts"] = len(runs)
    totals["failed_bursts"] = sum(1 for s, _, _ in runs if s == "failed")
    # Redis agrees with the ledger: nothing pending or leased, the DLQ is exactly the failed jobs
    snap = q.dispatch.snapshot()
    assert snap.ready == set() and snap.delayed == {} and snap.leased == {}, snap
    assert snap.dead == {j for j, r in rows.items() if r.status == "failed"}
    return dict(totals)


def drain(q: qkit.Queue, timeout: float = 25.0) -> None:
    """Bursts (no faults) until the ledger and Redis are both settled; waits on state between bursts."""
    deadline = time.monotonic() + timeout
    while True:
        q.work()
        counts = q.ledger.status_counts(q.name)
        inv = q.dispatch.inventory()
        active = counts["pending"] + counts["processing"]
        if active == 0 and inv.ready + inv.delayed + inv.leased == 0 and inv.dead == counts["failed"]:
            return
        assert time.monotonic() < deadline, f"never settled: ledger {counts}, redis {inv}"

        def actionable() -> bool:
            inv = q.dispatch.inventory()
            counts = q.ledger.status_counts(q.name)
            drifted = (inv.ready + inv.delayed + inv.leased < counts["pending"] + counts["processing"]
                       or inv.dead < counts["failed"])
            return inv.ready > 0 or inv.delayed_due > 0 or inv.leases_expired > 0 or drifted

        wait_for(actionable, timeout=max(0.1, deadline - time.monotonic()),
                 what="a job to fall due, a lease to expire or drift to repair")


# --------------------------------------------------------------------------- enqueue
def test_enqueue_retried_with_keys_is_exactly_once(faulty, tmp_path):
    q = make_queue(faulty, tmp_path, "fx-enqueue")
    faults = faulty.app.state.faults
    log = tmp_path / "log"
    given: set[int] = set()
    try:
        for n, action in enumerate(ALL_FAULTS):
            items = [{"type": "fx-ok", "payload": {"log": str(log)}, "key": f"batch{n}-item{i}"} for i in range(25)]
            faults.arm(action)
            with pytest.raises(BackendUnavailable) as caught:
                q.enqueue_many(items)  # the push met the fault: did it run?  The caller cannot know
            assert_one_line_naming_url(caught.value)
            ids = q.enqueue_many(items)  # so it retries, with the same keys
            assert q.enqueue_many(items) == ids  # as often as it likes
            assert len(set(ids)) == 25 and not given & set(ids)
            given |= set(ids)
            in_redis = q.dispatch.snapshot().ready & set(ids)
            # the retry returned the ids without pushing: a push that never ran is left to the next burst
            assert in_redis == (set(ids) if action in FAULTS_AFTER else set()), action
        assert [f for f in faults.fired if f != "ok"] == list(ALL_FAULTS)
        counts = q.ledger.status_counts(q.name)
        assert counts["pending"] == len(given) == 25 * len(ALL_FAULTS)

        # without a key the same retry enqueues the job twice: the caller cannot tell, hence keys
        faults.arm("500_after")
        with pytest.raises(BackendUnavailable):
            q.enqueue("fx-ok", {"log": str(log)})
        q.enqueue("fx-ok", {"log": str(log)})
        twice = [j for j in q.jobs(limit=1000) if j.idempotency_key is None]
        assert len(twice) == 2 and twice[0].payload == twice[1].payload
        given |= {j.id for j in twice}

        summary = q.work()  # no faults now: the drift check pushes what was never pushed, all run once
        assert summary.completed == len(given)
        totals = audit(q, log, given)
        assert totals["executions"] == len(given) and totals["lost"] == 0
    finally:
        q.close()


def test_enqueue_retry_after_the_job_died_returns_the_failed_job(faulty, tmp_path):
    """"Retry with the same key" has no gap: a failed job keeps its key (docs/semantics.md#idempotency).

    The first push did run (its answer was lost), a burst ran the job and it
    died before the caller retried: the retry gets the failed job's id and
    enqueues nothing.  Replaying it keeps the key; once purged, the key
    enqueues a new job.
    """
    q = make_queue(faulty, tmp_path, "fx-late-retry")
    faults = faulty.app.state.faults
    log = tmp_path / "log"
    item = {"type": "fx-bad", "payload": {"log": str(log)}, "max_attempts": 1, "key": "once"}
    try:
        faults.arm("drop_after")
        with pytest.raises(BackendUnavailable):
            q.enqueue_many([item])
        assert q.work().failed == 1  # meanwhile a burst ran it: dead
        [first] = q.dead()
        [again] = q.enqueue_many([item])  # the caller's late retry
        assert again == first.id and first.idempotency_key == "once"
        assert q.get(again).status == "failed" and q.ledger.status_counts(q.name)["pending"] == 0
        assert q.dispatch.snapshot().dead == {first.id}
        assert q.replay(first.id) == [first.id] and q.enqueue_many([item]) == [first.id]
        assert q.work().failed == 1 and q.purge_dead() == 1
        [new] = q.enqueue_many([item])
        assert new != first.id and q.get(new).status == "pending"
    finally:
        q.close()


# --------------------------------------------------------------------------- claim / settle, one fault each
def five_jobs_then_faults(q: qkit.Queue, faults, log: Path, position: str, action: str,
                          repeat: int = 0) -> tuple[set[int], list[str]]:
    """Five ``fx-ok`` jobs; then ``action`` armed on the burst's claim or settle request (and ``repeat``
    more times): (the job ids, the plan of the burst's first requests)."""
    ids = set(q.enqueue_many([{"type": "fx-ok", "payload": {"log": str(log)}} for _ in range(5)]))
    plan = ["ok", action] if position == "claim" else ["ok", "ok", action]
    faults.clear()  # forget the enqueue's request: fired must show the burst's alone
    faults.arm(*plan, *[action] * repeat)
    return ids, plan


def assert_each_ran_once(q: qkit.Queue, log: Path, ids: set[int], failed_bursts: int) -> None:
    drain(q)
    totals = audit(q, log, ids)
    # every job ran exactly once: an unknown outcome never cost a second execution
    assert totals == {"executions": 5, "lost": 0, "completed": 5, "bursts": totals["bursts"],
                      "failed_bursts": failed_bursts}


@pytest.mark.parametrize("action", ALL_FAULTS)
@pytest.mark.parametrize("position", ["claim", "settle"])
def test_one_lost_claim_or_settle_answer_is_ridden_out(faulty, tmp_path, position, action):
    """One failed claim or settle request: the live worker retries it within its leases and the burst
    ends well; every job runs exactly once (a claim applied without an answer leaves its jobs
    leased until the lease expires, then they run)."""
    q = make_queue(faulty, tmp_path, f"fx1-{position}", lease=CLIENT_TIMEOUT + 1.0)
    faults = faulty.app.state.faults
    log = tmp_path / "log"
    try:
        ids, plan = five_jobs_then_faults(q, faults, log, position, action)
        q.work()
        assert faults.fired[:len(plan)] == plan
        wait_for(lambda: (lambda inv: inv.leased == inv.leases_expired)(q.dispatch.inventory()),
                 what="orphaned leases to expire")
        assert_each_ran_once(q, log, ids, failed_bursts=0)
    finally:
        q.close()


@pytest.mark.parametrize("action", ALL_FAULTS)
@pytest.mark.parametrize("position", ["claim", "settle"])
def test_lost_claim_or_settle_answer(faulty, tmp_path, position, action):
    """A burst is three requests here: inventory, claim (gets all 5 jobs), settle-and-claim (gets none).
    The fault persists past the worker's retry bound, so the burst gives up."""
    # a lease outlives the client's timeout (as in production: 60 s vs 10 s), so a claim whose
    # answer timed out still holds its jobs when the burst gives up
    # (the worker retries a timed-out request while those leases would still hold: 3 s more)
    q = make_queue(faulty, tmp_path, f"fx-{position}", lease=CLIENT_TIMEOUT + (3.0 if action == "timeout_after" else 0))
    faults = faulty.app.state.faults
    log = tmp_path / "log"
    try:
        # every later request fails too (renewals included)
        ids, plan = five_jobs_then_faults(q, faults, log, position, action, repeat=200)
        with pytest.raises(BackendUnavailable) as caught:
            q.work()
        assert_one_line_naming_url(caught.value)
        assert "gave up" in str(caught.value)
        # the fault hit the request meant
        assert faults.fired[:len(plan)] == plan
        faults.clear()
        applied = action in FAULTS_AFTER
        ran = len([r for r in read_log(log) if r[0] == "done"])
        assert ran == (5 if position == "settle" else 0)

        inv = q.dispatch.inventory()
        if position == "claim" and applied or position == "settle" and not applied:
            # leased to a burst that is gone: nobody may take them before the lease expires
            assert inv.leased == 5
            again = q.work()
            assert (again.processed, again.lost) == (0, 0)
            assert len(read_log(log)) == 2 * ran
            wait_for(lambda: q.dispatch.inventory().leases_expired == 5, what="the orphaned leases to expire")
        assert_each_ran_once(q, log, ids, failed_bursts=1)
    finally:
        q.close()


def test_retry_whose_settle_was_lost_still_waits_for_its_back_off(faulty, tmp_path):
    """docs/semantics.md#order: a retry is not due before its ``run_at``, also when its Redis settle never arrived.

    The first attempt fails and the ledger schedules the retry far ahead; the
    settle request that would move the job to Redis's delayed set fails, so the
    job stays leased to a burst that is gone.  When that lease expires, the
    reclaiming burst must put the job back to wait, not run it early.
    """
    q = make_queue(faulty, tmp_path, "fx-backoff", lease=0.5, backoff_base=600, backoff_max=600)
    faults = faulty.app.state.faults
    log = tmp_path / "log"
    try:
        job_id = q.enqueue("fx-flaky", {"log": str(log)})
        delay = q.backoff.delay(job_id, 0, 1)
        assert delay > 30  # deterministic jitter: far beyond the lease and this test
        faults.clear()
        faults.arm("ok", "ok", *["500_before"] * 200)  # inventory, claim, then settle-and-claim fails for good
        with pytest.raises(BackendUnavailable):
            q.work()
        faults.clear()
        job = q.get(job_id)
        assert (job.status, job.attempts) == ("pending", 1)
        assert q.dispatch.snapshot().place_of(job_id) == "leased"
        wait_for(lambda: q.dispatch.inventory().leases_expired == 1, what="the orphaned lease to expire")

        summary = q.work()
        assert (summary.processed, summary.lost) == (0, 0)
        assert [r[2] for r in read_log(log) if r[0] == "start"] == [1]  # attempt 2 did not run early
        job = q.get(job_id)
        assert (job.status, job.attempts) == ("pending", 1)
        snap = q.dispatch.snapshot()
        assert snap.place_of(job_id) == "delayed"
        # due again when the ledger says, to within the clocks' resolution
        due_ms = snap.delayed[job_id]
        assert abs(due_ms - job.run_at.timestamp() * 1000) < 1000
    finally:
        q.close()


@pytest.mark.parametrize("action", ["500_before", "500_after"])
def test_purge_whose_redis_call_failed_is_repaired_by_the_next_burst(faulty, tmp_path, action):
    """A DLQ purge is two writes (ledger rows, Redis DLQ entries); a fault between them must heal.

    Whichever write is left undone, the next burst's drift check must bring
    Redis's DLQ back to exactly the ledger's failed jobs, and a retried purge
    must empty both.
    """
    q = make_queue(faulty, tmp_path, "fx-purge")
    faults = faulty.app.state.faults
    log = tmp_path / "log"
    try:
        q.enqueue_many([{"type": "fx-bad", "payload": {"log": str(log)}, "max_attempts": 1} for _ in range(3)])
        assert q.work().failed == 3
        faults.arm(action)
        with pytest.raises(BackendUnavailable) as caught:
            q.purge_dead()
        assert_one_line_naming_url(caught.value)
        q.work()  # the next burst
        assert q.dispatch.snapshot().dead == {j.id for j in q.dead()}
        assert q.purge_dead() == 3  # the caller's retry: the ledger delete never happened
        assert q.dead() == [] and q.dispatch.snapshot().dead == set()
    finally:
        q.close()


# --------------------------------------------------------------------------- renew: one worker's path fails
@pytest.mark.parametrize("action", ALL_FAULTS)
def test_renewals_failing_on_one_workers_path(faulty, clean, tmp_path, action):
    """Worker A's network path fails while its job runs; worker B's path is healthy.

    If A's renewals do not reach Redis (or hang past the lease), the lease
    lapses, B reclaims the job (A's attempt recorded ``lost``) and runs it,
    and A's late outcome is fenced.  If they reach Redis but the answers are
    lost, A keeps its lease and its result is the one recorded.
    """
    lease = 0.5
    a = make_queue(faulty, tmp_path, "fx-renew", lease=lease)
    b = make_queue(clean, tmp_path, "fx-renew", lease=lease)
    faults = faulty.app.state.faults
    log, gate = tmp_path / "log", tmp_path / "gate"
    outcome: dict[str, BaseException] = {}

    def burst_a() -> None:
        try:
            a.work()
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            outcome["a"] = exc

    job_id = b.enqueue("fx-gate", {"log": str(log), "gate": str(gate)})
    thread = threading.Thread(target=burst_a)
    try:
        thread.start()
        wait_for(lambda: read_log(log), what="A's handler to start")
        faults.arm(*[action] * 1000)  # from now on every request of A fails this way
        lapses = action in FAULTS_BEFORE or action == "timeout_after"
        if lapses:
            def reclaimed_by_b() -> bool:
                if b.dispatch.inventory().leases_expired:
                    b.work()
                return b.get(job_id).status == "completed"

            wait_for(reclaimed_by_b, what="B to reclaim and finish the job")
        else:
            # renewals run while their answers are lost: more than a lease's worth of them
            wait_for(lambda: len(faults.fired) >= 4, what="A's renewals")
            assert b.get(job_id).status == "processing"
        gate.touch()
        thread.join(15)
        assert not thread.is_alive()
        assert_one_line_naming_url(outcome["a"])  # A's next request after the job failed: its burst ended
        faults.clear()
        drain(b)
        totals = audit(b, log, {job_id})
        workers = [w for what, _, _, w in read_log(log) if what == "start"]
        with b.ledger.read_engine.connect() as conn:
            outcomes = list(conn.execute(select(job_attempts.c.outcome).where(job_attempts.c.job_id == job_id)
                                         .order_by(job_attempts.c.attempt)).scalars())
        if lapses:
            assert outcomes == ["lost", "completed"] and len(set(workers)) == 2
            assert totals["executions"] == 2 and totals["lost"] == 1  # the extra execution is the lost attempt
        else:
            assert outcomes == ["completed"] and len(workers) == 1
    finally:
        gate.touch()
        thread.join(15)
        a.close()
        b.close()


# --------------------------------------------------------------------------- a mixed workload under faults
def test_mixed_workload_under_random_faults(faulty, tmp_path):
    """Enqueuer and two burst loops run concurrently while a random mix of requests fails.

    Afterwards (faults off) bursts finish everything, and the audit holds.
    """
    rng = random.Random(20240611)
    faults = faulty.app.state.faults
    plan, timeouts = [], 0
    for _ in range(400):
        action = "ok"
        if rng.random() < 0.2:
            action = rng.choice(ALL_FAULTS)
            if action == "timeout_after":
                timeouts += 1
                if timeouts > 3:  # each one costs a client timeout: keep the test short
                    action = "drop_after"
        plan.append(action)
    log = tmp_path / "log"
    name = "fx-mixed.eu-1"
    opened = [make_queue(faulty, tmp_path, name, lease=1.0, backoff_base=0.05) for _ in range(3)]
    producer, workers = opened[0], opened[1:]
    given: set[int] = set()
    errors: list[BaseException] = []
    enqueue_retries = collections.Counter()
    done_enqueueing = threading.Event()
    stop = threading.Event()

    def item(n: int, i: int) -> dict:
        roll = (n * 31 + i) % 20
        kind, extra = ("fx-flaky", {}) if roll < 3 else ("fx-bad", {"max_attempts": 2}) if roll < 5 else \
            ("fx-ok", {"delay": 0.1} if roll == 5 else {})
        return {"type": kind, "payload": {"log": str(log), "ms": (i * 7) % 20}, "key": f"job-{n}-{i}", **extra}

    def enqueuer() -> None:
        try:
            for n in range(8):
                items = [item(n, i) for i in range(30)]
                for _ in range(50):
                    try:
                        given.update(producer.enqueue_many(items))
                        break
                    except BackendUnavailable as exc:
                        errors.append(exc)
                        enqueue_retries[n] += 1
                else:
                    raise AssertionError("enqueue never got through")
        finally:
            done_enqueueing.set()

    def burst_loop(q: qkit.Queue) -> None:
        while not stop.is_set():
            try:
                summary = q.work(concurrency=2)
            except BackendUnavailable as exc:
                errors.append(exc)
                continue
            if summary.processed == 0:
                stop.wait(0.02)  # poll interval of an idle worker

    faults.arm(*plan)
    threads = [threading.Thread(target=enqueuer)] + [threading.Thread(target=burst_loop, args=(w,)) for w in workers]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: done_enqueueing.is_set() and faults.pending == 0, timeout=30,
                 what="the enqueuer to finish and the armed faults to be used up")
        stop.set()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
        faults.clear()

        drain(workers[0])
        totals = audit(workers[0], log, given)
        assert len(given) == 240  # one id per key was given back to the enqueuer
        assert totals["completed"] + totals["failed"] == 240
        # the faults did hit: bursts died on them, and each said so in one line naming the URL variable
        assert errors and totals["failed_bursts"] > 0
        for exc in errors:
            assert_one_line_naming_url(exc)
        assert set(plan) - {"ok"} == set(ALL_FAULTS)
    finally:
        stop.set()
        for q in opened:
            q.close()

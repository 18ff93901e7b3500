"""Property test: random sequences of enqueue / claim / ack / fail / crash / reclaim / replay.

After every step each job is in exactly one place, and Redis agrees with the
ledger: pending <-> ready or delayed, processing <-> leased, failed <-> DLQ,
completed <-> nowhere; ``jobs.attempts`` equals the attempt rows of the
current replay epoch.
"""
from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import func, select

import qkit
from qkit.ledger import Outcome, job_attempts, jobs, utcnow

_names = itertools.count()


@qkit.handler("prop_ok", timeout=10)
def prop_ok(payload: dict) -> dict:
    return {"ok": True}


@qkit.handler("prop_fail", timeout=10)
def prop_fail(payload: dict) -> None:
    raise ValueError("always")


def make_machine(setup):
    class QueueMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.q = setup.connect(queue=f"prop{next(_names)}-{setup.queue}", backoff_base=0)
            self.crashed = 0  # abandoned leases, expired at once

        def teardown(self) -> None:
            self.q.close()

        @rule(n=st.integers(1, 4), priority=st.integers(-2, 2), failing=st.booleans(),
              attempts=st.integers(1, 3))
        def enqueue(self, n, priority, failing, attempts):
            self.q.enqueue_many([{"type": "prop_fail" if failing else "prop_ok", "payload": {},
                                  "priority": priority, "max_attempts": attempts} for _ in range(n)])

        @rule(k=st.integers(1, 5))
        def burst(self, k):
            """Claim, run, ack or fail: a real burst (also reclaims abandoned leases)."""
            self.q.work(max_jobs=k)

        @rule(k=st.integers(1, 3))
        def crash(self, k):
            """Claim and die before settling: lease 0 ms, so it is expired at once."""
            token = f"crash-{self.crashed}"
            self.crashed += 1
            claim = self.q.dispatch.claim(token, 0, k)
            plan = self.q.ledger.claim(self.q.name, token, claim.claimed, claim.reclaimed, self.q.backoff)
            if plan.settlements:  # it died after settling what the ledger had already decided
                self.q.dispatch.claim(token, 0, 0, plan.settlements)

        @rule(k=st.integers(1, 3))
        def late_completion(self, k):
            """A worker whose lease already expired tries to complete: always fenced."""
            claim = self.q.dispatch.claim("slow", 0, k)
            plan = self.q.ledger.claim(self.q.name, "slow", claim.claimed, claim.reclaimed, self.q.backoff)
            self.q.dispatch.claim("slow", 0, 0, plan.settlements)
            if not plan.runnable:
                return
            def still_current():
                return [r for r in plan.runnable if (lambda j: j.status == "processing" and j.attempts == r.attempt
                                                     and j.epoch == r.epoch)(self.q.get(r.id))]

            for _ in range(100):  # other workers reclaim the expired leases, one per claim
                if not still_current():
                    break
                self.q.work(max_jobs=1)
            assert not still_current()
            late = self.q.ledger.settle("slow", [Outcome(r, "completed", utcnow(), result={}) for r in plan.runnable],
                                        self.q.backoff)
            assert sorted(late.fenced) == sorted(r.id for r in plan.runnable)

        @rule()
        def replay(self):
            dead = self.q.dead()
            if dead:
                self.q.replay(dead[0].id)

        @invariant()
        def every_job_in_exactly_one_place(self):
            snap = self.q.dispatch.snapshot()
            places = [snap.ready, set(snap.delayed), set(snap.leased), snap.dead]
            for a, b in itertools.combinations(places, 2):
                assert not (a & b)
            with self.q.ledger.read_engine.connect() as conn:
                status = dict(conn.execute(select(jobs.c.id, jobs.c.status).where(jobs.c.queue == self.q.name)).all())
                counts = dict(conn.execute(
                    select(jobs.c.id, func.count(job_attempts.c.id))
                    .select_from(jobs.outerjoin(job_attempts, (job_attempts.c.job_id == jobs.c.id)
                                                & (job_attempts.c.epoch == jobs.c.epoch)))
                    .where(jobs.c.queue == self.q.name).group_by(jobs.c.id)).all())
                attempts = dict(conn.execute(select(jobs.c.id, jobs.c.attempts).where(jobs.c.queue == self.q.name)).all())
            for job_id, st_ in status.items():
                place = snap.place_of(job_id)
                expected = {"pending": {"ready", "delayed"}, "processing": {"leased"},
                            "failed": {"dead"}, "completed": {None}}[st_]
                assert place in expected, (job_id, st_, place)
                assert counts[job_id] == attempts[job_id], (job_id, counts[job_id], attempts[job_id])
            assert set().union(*places) <= set(status)

    return QueueMachine


def test_random_operation_sequences_keep_redis_and_ledger_in_agreement(setup):
    if setup.name == "upstash-sqlite":
        max_examples = 8
    else:
        max_examples = 25
    machine = make_machine(setup)
    machine.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=12, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()

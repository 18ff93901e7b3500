"""``bench/latency.py --trace``: where a `qkit work --forever` wake-up's time goes, stamped inside the worker.

The worker process runs :func:`worker_main`, which wraps a few of qkit's own functions (nothing in qkit
changes) and appends one JSON line per wake-up that claimed something to ``QKIT_LATENCY_TRACE``:
``perf_counter_ns`` (CLOCK_MONOTONIC on Linux: the same clock in every process, so the producer's stamps
compare) when the wake-up message was taken, when the claim script returned, when the ledger's claim
committed, when the handler thread began, and, per job, when the handler began (the ``stamp`` handler
returns it).  The producer stamps its call, its ledger insert's commit and its return.  :func:`summarise`
turns both into the per-step quantiles the bench prints.  The wrappers cost a few µs per wake-up.
"""
from __future__ import annotations

import gc
import json
import os
import time

_NS = time.perf_counter_ns


def _q(values: list[float]) -> dict:
    v = sorted(values)
    if not v:
        return {}
    pick = lambda q: round(v[min(len(v) - 1, int(q * len(v)))], 3)  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def _count_lock_waits(waits: list, phase=lambda: "") -> None:
    """Record each sleep of this process's SQLite writers waiting for the lock (``_begin_immediate``'s
    steps, while another writer holds it): [ms asked, phase]."""
    from qkit.ledger import engine

    class _Time:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            waits.append([round(seconds * 1000, 3), phase()])
            time.sleep(seconds)

    engine.time = _Time  # the module's own name for ``time``: only its lock waits go through this


def install_worker_probes(path: str) -> None:
    """Wrap the wake-up path of this (worker) process; one line per claiming wake-up goes to ``path``."""
    from qkit.backends.redis import PubSubListener
    from qkit.engine import batches, pool
    from qkit.engine.dispatch import Dispatch
    from qkit.ledger import Ledger

    out = open(path, "a", buffering=1)
    rec: dict = {}
    waits: list[float] = []
    _count_lock_waits(waits, lambda: "claim" if "claim" in rec and "ledger" not in rec else
                      "settle" if "ledger" in rec and "settle" not in rec else "other")
    gc_ns = [0, 0]  # collections, ns spent in them (since the last record)

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_ns.append(_NS())
        elif len(gc_ns) > 2:
            gc_ns[0] += 1
            gc_ns[1] += _NS() - gc_ns.pop()

    gc.callbacks.append(on_gc)

    def flush() -> None:
        if rec.get("ids"):
            rec["gc"] = gc_ns[:2]
            rec["lock_waits_ms"] = waits[:]
            waits.clear()
            out.write(json.dumps(rec) + "\n")
        rec.clear()
        gc_ns[0] = gc_ns[1] = 0

    wait = PubSubListener.wait

    def traced_wait(self, timeout, stop):  # type: ignore[no-untyped-def]
        flush()  # idle time: the previous wake-up's line is written now, not on the path
        woke = wait(self, timeout, stop)
        if woke:
            rec["wake"] = _NS()
        return woke

    claim = Dispatch.claim

    def traced_claim(self, *a, **k):  # type: ignore[no-untyped-def]
        t = _NS()
        result = claim(self, *a, **k)
        if result.claimed and "wake" in rec and "claim" not in rec:
            rec.update(claim_start=t, claim=_NS(), ids=list(result.claimed))
        return result

    ledger_claim = Ledger.claim

    def traced_ledger_claim(self, *a, **k):  # type: ignore[no-untyped-def]
        t = _NS()
        plan = ledger_claim(self, *a, **k)
        if "claim" in rec and "ledger" not in rec:
            rec.update(ledger_start=t, ledger=_NS())
        return plan

    def stamp_thread(run):  # type: ignore[no-untyped-def]
        def traced(self, *a, **k):  # type: ignore[no-untyped-def]
            if "ledger" in rec and "thread" not in rec:
                rec["thread"] = _NS()
            return run(self, *a, **k)
        return traced

    # today's handler thread (a runner per batch) or a kept one, whichever this qkit has
    for cls_name in ("SerialRunner", "HandlerThread"):
        cls = getattr(pool, cls_name, None) or getattr(batches, cls_name, None)
        if cls is not None and hasattr(cls, "_run_jobs"):
            cls._run_jobs = stamp_thread(cls._run_jobs)

    settle = Ledger.settle

    def traced_settle(self, *a, **k):  # type: ignore[no-untyped-def]
        t = _NS()
        plan = settle(self, *a, **k)
        if "ledger" in rec and "settle" not in rec:
            rec.update(settle_start=t, settle=_NS())
        return plan

    PubSubListener.wait = traced_wait
    Dispatch.claim = traced_claim
    Ledger.claim = traced_ledger_claim
    Ledger.settle = traced_settle


def worker_main() -> None:
    install_worker_probes(os.environ["QKIT_LATENCY_TRACE"])
    import sys

    from qkit.cli import entry_point

    sys.argv[0] = "qkit"
    entry_point()


def install_producer_probes(stamps: dict) -> None:
    """Stamp the end of the ledger insert (its commit, with the fsync) of each enqueue in this process."""
    from qkit.ledger import Ledger

    insert = Ledger.insert_jobs

    def traced(self, *a, **k):  # type: ignore[no-untyped-def]
        t = _NS()
        results = insert(self, *a, **k)
        stamps["insert_start"], stamps["insert"] = t, _NS()
        return results

    Ledger.insert_jobs = traced
    stamps["lock_waits_ms"] = []
    _count_lock_waits(stamps["lock_waits_ms"])


def summarise(path: str, sent: dict[int, tuple[int, int, int, int]], handler_ns: dict[int, int],
              producer_waits: list[float]) -> dict:
    """Per-step quantiles (ms).  ``sent``: job -> (call, insert start, insert committed, return) in ns."""
    ms = lambda a, b: (b - a) / 1e6  # noqa: E731
    steps: dict[str, list[float]] = {k: [] for k in (
        "call_to_insert", "insert_incl_commit", "insert_to_return_push", "return_to_wake", "wake_to_claim_start",
        "claim_script", "claim_to_ledger_start", "ledger_claim", "ledger_to_thread", "thread_to_handler",
        "handler_to_settle_start", "ledger_settle", "wake_to_handler")}
    gcs = 0
    worker_waits: list = []
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            gcs += r.get("gc", [0])[0]
            worker_waits += r.get("lock_waits_ms", [])
            if len(r["ids"]) != 1 or r["ids"][0] not in sent or r["ids"][0] not in handler_ns:
                continue  # a batch of several: its first job's own path is not the others'
            job = r["ids"][0]
            call, ins0, ins1, ret = sent[job]
            h = handler_ns[job]
            steps["call_to_insert"].append(ms(call, ins0))
            steps["insert_incl_commit"].append(ms(ins0, ins1))
            steps["insert_to_return_push"].append(ms(ins1, ret))
            steps["return_to_wake"].append(ms(ret, r["wake"]))
            steps["wake_to_claim_start"].append(ms(r["wake"], r["claim_start"]))
            steps["claim_script"].append(ms(r["claim_start"], r["claim"]))
            steps["claim_to_ledger_start"].append(ms(r["claim"], r["ledger_start"]))
            steps["ledger_claim"].append(ms(r["ledger_start"], r["ledger"]))
            if "thread" in r:
                steps["ledger_to_thread"].append(ms(r["ledger"], r["thread"]))
                steps["thread_to_handler"].append(ms(r["thread"], h))
            if "settle" in r:
                steps["handler_to_settle_start"].append(ms(h, r["settle_start"]))
                steps["ledger_settle"].append(ms(r["settle_start"], r["settle"]))
            steps["wake_to_handler"].append(ms(r["wake"], h))
    out = {k: _q(v) for k, v in steps.items()}
    out["single_job_wakeups"] = len(steps["wake_to_handler"])
    out["gc_collections"] = gcs
    # sleeps of BEGIN IMMEDIATE waiting for the other process's lock: how many, their total and longest step
    out["lock_waits"] = {}
    for who, waits in (("worker", worker_waits), ("producer", producer_waits)):
        for phase in sorted({p for _, p in waits}):
            w = [ms for ms, p in waits if p == phase]
            out["lock_waits"][f"{who} {phase}".strip()] = {"n": len(w), "total_ms": round(sum(w), 2),
                                                            "max_ms": round(max(w), 2)}
    return out


if __name__ == "__main__":
    worker_main()

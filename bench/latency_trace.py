"""``bench/latency.py --trace``: where a `qkit work --forever` wake-up's time goes, stamped inside the worker.

The worker process runs :func:`worker_main`, which wraps a few of qkit's own functions (nothing in qkit
changes) and appends one JSON line per wake-up that claimed something to ``QKIT_LATENCY_TRACE``:
``perf_counter_ns`` (CLOCK_MONOTONIC on Linux: the same clock in every process, so the producer's stamps
compare) when the wake-up message was taken, when the claim script returned, when the ledger's claim
committed, when the handler thread began, and, per job, when the handler began (the ``stamp`` handler
returns it).  The producer stamps its call, its ledger insert, its push, its fsync and its return.  :func:`summarise`
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
    from qkit.engine import pool
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

    PubSubListener.wait = traced_wait
    # each step stamped once per wake-up, after the one before it (later claims and settles are not this job's)
    _stamp(Dispatch, "claim", rec, "claim", after="wake",
           keep=lambda result: rec.update(ids=list(result.claimed)) if result.claimed else False)
    _stamp(Ledger, "claim", rec, "ledger", after="claim")
    _stamp(Ledger, "settle", rec, "settle", after="ledger")

    def stamp_thread(run):  # type: ignore[no-untyped-def]
        def traced(self, *a, **k):  # type: ignore[no-untyped-def]
            if "ledger" in rec and "thread" not in rec:
                rec["thread"] = _NS()
            return run(self, *a, **k)
        return traced

    # the handler thread's batch loop, whether started per batch or kept for the burst
    pool.SerialRunner._run_jobs = stamp_thread(pool.SerialRunner._run_jobs)


def _stamp(cls: type, name: str, rec: dict, key: str, after: str | None = None,
           keep=lambda result: True) -> None:  # type: ignore[no-untyped-def]
    """Wrap ``cls.name``: its start and end go into ``rec`` as ``key_start`` and ``key`` (once: the first
    call after ``after`` was stamped, whose result ``keep`` accepts)."""
    method = getattr(cls, name)

    def traced(self, *a, **k):  # type: ignore[no-untyped-def]
        t = _NS()
        result = method(self, *a, **k)
        if key not in rec and (after is None or after in rec) and keep(result) is not False:
            rec[f"{key}_start"], rec[key] = t, _NS()
        return result

    setattr(cls, name, traced)


def worker_main() -> None:
    install_worker_probes(os.environ["QKIT_LATENCY_TRACE"])
    import sys

    from qkit.cli import entry_point

    sys.argv[0] = "qkit"
    entry_point()


def install_producer_probes(stamps: dict) -> None:
    """Stamp each enqueue's steps in this process: its ledger insert (the commit, not waiting for the disk
    on SQLite), its push to Redis, its fsync of the write-ahead log (``Ledger.sync``, before it returns)."""
    from qkit.engine.dispatch import Dispatch
    from qkit.ledger import Ledger

    _stamp(Ledger, "insert_jobs", stamps, "insert")
    _stamp(Dispatch, "push", stamps, "push")
    if hasattr(Ledger, "sync"):
        _stamp(Ledger, "sync", stamps, "sync")
    stamps["lock_waits_ms"] = []
    _count_lock_waits(stamps["lock_waits_ms"])


def summarise(path: str, sent: dict[int, dict], handler_ns: dict[int, int], producer_waits: list) -> dict:
    """Per-step quantiles (ms) of the jobs that had a wake-up of their own.  ``sent``: job -> the producer's
    stamps (ns): ``call``, ``insert_start``/``insert``, ``push_start``/``push``, ``sync_start``/``sync``, ``return``."""
    pairs = {  # step: (from, to), a stamp of the producer's (p.), the worker's (w.) or the handler's start (h)
        "call_to_insert": ("p.call", "p.insert_start"), "insert_commit": ("p.insert_start", "p.insert"),
        "push_script": ("p.push_start", "p.push"), "sync_fsync": ("p.sync_start", "p.sync"),
        "enqueue_call": ("p.call", "p.return"),
        "push_reply_to_wake": ("p.push", "w.wake"), "wake_to_claim_start": ("w.wake", "w.claim_start"),
        "claim_script": ("w.claim_start", "w.claim"), "claim_to_ledger_start": ("w.claim", "w.ledger_start"),
        "ledger_claim": ("w.ledger_start", "w.ledger"), "ledger_to_thread": ("w.ledger", "w.thread"),
        "thread_to_handler": ("w.thread", "h"), "wake_to_handler": ("w.wake", "h"),
        "return_to_handler": ("p.return", "h"), "handler_to_settle_start": ("h", "w.settle_start"),
        "ledger_settle": ("w.settle_start", "w.settle")}
    steps: dict[str, list[float]] = {k: [] for k in pairs}
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
            at = {**{f"p.{k}": v for k, v in sent[job].items()}, **{f"w.{k}": v for k, v in r.items()},
                  "h": handler_ns[job]}
            for step, (a, b) in pairs.items():
                if isinstance(at.get(a), int) and isinstance(at.get(b), int):
                    steps[step].append((at[b] - at[a]) / 1e6)
    out: dict = {k: _q(v) for k, v in steps.items()}
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

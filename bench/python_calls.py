"""Python function calls per job on the enqueue and burst paths, counted by cProfile.

``python bench/python_calls.py [--n 20000] [--backend embedded|redis] [--ledger sqlite|postgres] [--top 12]``

In this process: ``enqueue_many`` of N no-op jobs (batches of 10,000), then one burst (``q.work()``, the
bench's no-op handlers), each under cProfile; threads started during the call (the handler thread,
the lease renewer) get a profiler of their own, added in.  Calls per job are the profile's total calls divided by N, with the functions called most
often per job; the servers' and the database's own work is not in it (bench/README.md#profiles).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from throughput import open_stack  # noqa: E402  (first: it puts the repository on the path)

import qkit  # noqa: E402

import noop_handlers  # noqa: E402,F401  (registers the no-op handler)


def counted(fn, n: int, top: int) -> dict:
    profiles: list[cProfile.Profile] = []
    thread_run = threading.Thread.run

    def run_profiled(self: threading.Thread) -> None:
        mine = cProfile.Profile()
        profiles.append(mine)
        mine.enable()
        try:
            thread_run(self)
        finally:
            mine.disable()

    prof = cProfile.Profile()
    threading.Thread.run = run_profiled  # type: ignore[method-assign]
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
        threading.Thread.run = thread_run  # type: ignore[method-assign]
    stats = pstats.Stats(prof, *profiles)
    rows = sorted(((v[1], k[2] if k[0] == "~" else f"{Path(k[0]).name}:{k[2]}")  # "~": a built-in
                   for k, v in stats.stats.items()), reverse=True)[:top]
    return {"calls_per_job": round(stats.total_calls / n, 1), "primitive_calls_per_job": round(stats.prim_calls / n, 1),
            "most_called_per_job": {name: round(calls / n, 2) for calls, name in rows}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--backend", choices=("embedded", "redis"), default="embedded")
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    stack = open_stack(a.backend, a.ledger)
    try:
        q = qkit.connect("calls", database_url=stack.database_url("calls"), **stack.overrides)
        items = [{"type": "noop", "payload": {}} for _ in range(a.n)]

        def enqueue() -> None:
            for start in range(0, a.n, 10_000):
                q.enqueue_many(items[start:start + 10_000])

        res = {"n": a.n, "backend": a.backend, "ledger": a.ledger,
               "enqueue": counted(enqueue, a.n, a.top)}
        summary = {}
        res["burst"] = counted(lambda: summary.update(done=q.work().completed), a.n, a.top)
        if summary.get("done") != a.n:
            raise SystemExit(f"bench: the burst completed {summary.get('done')} of {a.n} jobs")
        res["loadavg_1m"] = round(os.getloadavg()[0], 2)
        q.close()
    finally:
        stack.close()
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

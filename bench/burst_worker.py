"""One burst worker process for the benchmarks; prints one JSON line when the burst ends.

``python bench/burst_worker.py --queue Q [--concurrency K] [--profile PREFIX]``

It is ``qkit work`` plus what the harness needs back from the worker process:
wall-clock timestamps (so the parent can time from process start to the end
of the burst), the backend's client-side command/request counters, the
ledger's statement counter and the SQL calls actually sent (counted with a
SQLAlchemy event, as a cross-check of ``Ledger.statements``).  Settings come
from the environment (QKIT_HOME, QKIT_REDIS_URL, UPSTASH_*, QKIT_DATABASE_URL,
QKIT_HANDLERS), exactly as for ``qkit work``.
"""
from __future__ import annotations

import time

T_PROCESS = time.time()  # before the imports: start-up cost is part of the burst's time

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402


def count_sql(engines: list[Any]) -> dict[str, int]:
    """Attach counters of cursor executions and commits to SQLAlchemy engines."""
    from sqlalchemy import event

    counts = {"calls": 0, "executemany": 0, "commits": 0}

    def on_execute(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        counts["calls"] += 1
        if executemany:
            counts["executemany"] += 1

    def on_commit(conn: Any) -> None:
        counts["commits"] += 1

    for engine in {id(e): e for e in engines}.values():
        event.listen(engine, "before_cursor_execute", on_execute)
        event.listen(engine, "commit", on_commit)
    return counts


def wrap_timer(totals: dict[str, float], owner: Any, attr: str, name: str) -> None:
    """Replace ``owner.attr`` by a wrapper adding its wall time to ``totals[name]`` (skip if absent)."""
    import functools

    fn = getattr(owner, attr, None)
    if fn is None:
        return
    totals.setdefault(name, 0.0)

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0

    setattr(owner, attr, timed)


def time_phases(q: Any) -> dict[str, float]:
    """Wrap the burst's per-batch steps with wall-clock timers (seconds, summed over the burst).

    The steps are called once per batch, so the timers cost nothing per job.
    A step the code does not have (it is being reworked) is skipped.
    """
    totals: dict[str, float] = {}

    def wrap(owner: Any, attr: str, name: str) -> None:
        wrap_timer(totals, owner, attr, name)

    import qkit.ops.reconcile
    import qkit.engine.worker

    wrap(q.dispatch, "claim", "redis_claim")          # settle previous batch + claim next (one script call)
    wrap(q.ledger, "claim", "ledger_claim")           # record the claim (one transaction)
    wrap(qkit.engine.worker.Worker, "_run_batch", "handlers")  # run the batch's handlers
    wrap(q.ledger, "settle", "ledger_settle")         # record the outcomes (one transaction)
    wrap(qkit.ops.reconcile, "repair_if_drifted", "drift_check")
    wrap(q.ledger, "start_run", "run_record")
    wrap(q.ledger, "finish_run", "run_record")
    return totals


def main(argv: list[str] | None = None) -> int:
    """Run one burst and print its figures as one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queue", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-jobs", type=int, default=None)
    p.add_argument("--profile", default=None, help="write a pyinstrument profile to PREFIX.{txt,flat.txt,html}")
    p.add_argument("--profile-interval", type=float, default=0.0005, help="pyinstrument sampling interval, s")
    p.add_argument("--no-phases", action="store_true", help="do not time the burst's steps")
    a = p.parse_args(argv)

    import qkit

    t_import = time.time()
    q = qkit.connect(a.queue)
    sql = count_sql([q.ledger.engine, q.ledger.read_engine])
    phases = {} if a.no_phases else time_phases(q)
    t_connected = time.time()
    profiler = None
    if a.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=a.profile_interval)
        profiler.start()
    t_burst = time.time()
    summary = q.work(max_jobs=a.max_jobs, concurrency=a.concurrency, trigger="cli")
    t_end = time.time()
    if profiler is not None:
        profiler.stop()
        write_profile(profiler, a.profile)
    out = {
        "summary": summary.to_dict(),
        "t_process": T_PROCESS, "t_import": t_import, "t_connected": t_connected, "t_burst": t_burst, "t_end": t_end,
        "backend": q.backend.kind,
        "counters": q.backend.counters(),
        "ledger_statements": q.ledger.statements,
        "sql": sql,
        "phases_s": {k: round(v, 4) for k, v in phases.items()},
        "maxrss_kb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    q.close()
    sys.stdout.write(json.dumps(out, default=str) + "\n")
    sys.stdout.flush()
    return 0


def write_profile(profiler: Any, prefix: str) -> None:
    """Tree, flat (self time per function) and HTML renderings of a pyinstrument session."""
    from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer

    session = profiler.last_session
    with open(prefix + ".txt", "w") as fh:
        fh.write(ConsoleRenderer(unicode=False, color=False, show_all=False, time="percent_of_total")
                 .render(session))
    with open(prefix + ".flat.txt", "w") as fh:
        fh.write(ConsoleRenderer(unicode=False, color=False, flat=True, time="percent_of_total").render(session))
    with open(prefix + ".html", "w") as fh:
        fh.write(HTMLRenderer().render(session))


if __name__ == "__main__":
    sys.exit(main())

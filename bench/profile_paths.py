"""Where the time goes: the enqueue and worker paths under a profiler, summarised.

    python bench/profile_paths.py [--n 20000] [--backend embedded|redis|upstash] [--ledger sqlite|postgres]
        [--latency-ms MS] [--out DIR] [--top 25] [--py-spy]

1. **pyinstrument, in-process** (``--interval`` 0.2 ms): ``enqueue_many`` of N
   no-op jobs, then ``q.work()`` in this same process (``noop_handlers``
   imported here).  pyinstrument samples only the thread that started it, so
   the handler thread's own work appears as the burst thread waiting for it.
2. **py-spy, the real worker process** (``--py-spy``; needs ``pip install
   py-spy``): a ``bench/burst_worker.py`` subprocess sampled at 1 kHz across
   all threads, start-up included.  py-spy sees no C frames, so time inside
   the DB driver or a socket shows on the Python line that called it.

For each profile it prints the share of samples per area (SQLAlchemy, the DB
driver, redis-py, qkit's ledger code, waiting on threads...), the top
functions by self time, and the inclusive share of qkit's main steps.  The
raw renderings (pyinstrument text/HTML, py-spy collapsed stacks) are kept in
``--out``.  Profiling slows the code: read shares, not rates.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import qkit  # noqa: E402
from throughput import ROOT, open_stack  # noqa: E402

#: qkit steps whose inclusive share is reported (function names as profilers print them)
STEPS = ["Ledger.insert_jobs", "Dispatch.push", "Ledger.claim", "Ledger.settle", "Dispatch.claim",
         "Worker._run_batch", "_SerialRunner.run", "_SerialRunner.watch", "run_in_context", "repair_if_drifted",
         "Ledger.start_run", "Ledger.finish_run", "Queue.__init__", "_find_and_load"]

Stack = tuple[tuple[str, str], ...]  # ((function, file), ...) root first


def area(stack: Stack) -> str:
    """Which part of the system a sample's innermost frame belongs to."""
    if any(fn == "_find_and_load" for fn, _ in stack):
        return "start-up: imports"
    fn, path = stack[-1]
    caller = stack[-2][1] if len(stack) > 1 else ""
    p = "/" + path.replace("\\", "/").lstrip("/")  # py-spy prints package-relative paths
    if path == "<built-in>":
        if fn.startswith(("Cursor.", "Connection.")) or "sqlite" in caller or "psycopg" in caller:
            return "DB driver (C)"
        if fn.startswith("socket.") or "redis/" in caller or "httpcore" in caller:
            return "socket I/O (waiting for Redis/HTTP)"
        if fn.startswith("lock.") or "threading" in caller:
            return "thread sync / waiting"
        if fn.startswith(("datetime.", "date.")):
            return "datetime"
        if "json" in caller:
            return "json"
        return "other built-ins"
    if "sqlalchemy/engine/default.py" in p and fn.endswith(("do_execute", "do_executemany", "do_commit")):
        return "DB driver (C)"
    for needle, name in (("/sqlalchemy/", "SQLAlchemy (Python)"), ("/psycopg/", "DB driver (Python)"),
                         ("/sqlite3/", "DB driver (Python)"), ("/redis/", "redis-py"),
                         ("/httpx/", "HTTP client"), ("/httpcore/", "HTTP client"), ("/upstash_redis/", "HTTP client"),
                         ("/h11/", "HTTP client"), ("/json/", "json"), ("/qkit/ledger/", "qkit ledger (Python)"),
                         ("/qkit/engine/worker.py", "qkit worker (Python)"), ("/qkit/engine/batches.py", "qkit worker (Python)"), ("/qkit/", "qkit other (Python)"),
                         ("/threading.py", "thread sync / waiting"),
                         ("/socket.py", "socket I/O (waiting for Redis/HTTP)"),
                         ("/selectors.py", "socket I/O (waiting for Redis/HTTP)")):
        if needle in p:
            return name
    return "other Python"


def summarise(samples: Iterable[tuple[Stack, float]], top: int) -> dict[str, Any]:
    """Shares per area, top self-time functions, inclusive shares of qkit's steps."""
    samples = list(samples)
    total = sum(w for _, w in samples) or 1.0
    by_area: Counter[str] = Counter()
    by_fn: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for stack, w in samples:
        if not stack:
            continue
        by_area[area(stack)] += w
        fn, path = stack[-1]
        short = path.split("site-packages/")[-1].split(f"{ROOT}/")[-1]
        by_fn[f"{fn}  ({short})"] += w
        for name in {f for f, _ in stack}:
            if name in STEPS:
                incl[name] += w
    pct = lambda v: round(100.0 * v / total, 1)  # noqa: E731
    return {
        "total": round(total, 4),
        "areas": {k: pct(v) for k, v in by_area.most_common()},
        "top_self": [(k, pct(v)) for k, v in by_fn.most_common(top)],
        "steps": {k: pct(incl[k]) for k in STEPS if incl[k]},
    }


def pyinstrument_samples(session: Any) -> list[tuple[Stack, float]]:
    """(stack, self seconds) of every frame of a pyinstrument session."""
    out: list[tuple[Stack, float]] = []

    def walk(frame: Any, stack: Stack) -> None:
        here = stack + ((_fn_name(frame), frame.file_path or "<built-in>"),)
        if frame.total_self_time > 0 and not frame.is_synthetic:
            out.append((here, frame.total_self_time))
        for child in frame.children:
            if child.is_synthetic:  # "[self]"/"[await]" leaves: time of the parent itself
                if child.time > 0:
                    out.append((here, child.time))
                continue
            walk(child, here)

    root = session.root_frame()
    if root is not None:
        walk(root, ())
    return out


def _fn_name(frame: Any) -> str:
    cls = getattr(frame, "class_name", None)
    return f"{cls}.{frame.function}" if cls else (frame.function or "?")


def pyspy_samples(raw: Path) -> tuple[list[tuple[Stack, float]], Counter[str]]:
    """Parse py-spy's collapsed stacks; returns samples and the sample count per thread name."""
    out: list[tuple[Stack, float]] = []
    threads: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        frames, thread = pyspy_line(body)
        if frames:
            out.append((frames, float(count)))
            threads[thread] += int(count)
    return out, threads


def pyspy_line(body: str) -> tuple[Stack, str]:
    """Frames of one collapsed py-spy stack, and a readable label of its thread."""
    parts = body.split(";")
    frames = tuple((part.rpartition(" (")[0] or part, part.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0])
                   for part in parts[1:])
    name = parts[0].split(":", 1)[-1].strip()
    if name.startswith("thread ("):
        # not yet named when sampled: the main thread during its imports, or a thread named by what it runs
        if frames and frames[0][1].endswith("burst_worker.py"):
            return frames, "MainThread"
        runs = [fn for fn, path in frames if fn.endswith((".run", "_loop", ".serve")) and "threading.py" not in path]
        name = runs[0] if runs else "other thread"
    return frames, name


def print_summary(title: str, s: dict[str, Any], extra: str = "") -> None:
    print(f"\n## {title}\n")
    if extra:
        print(extra + "\n")
    print("| area | share |\n|---|---:|")
    for k, v in s["areas"].items():
        print(f"| {k} | {v}% |")
    print("\n| qkit step (inclusive) | share |\n|---|---:|")
    for k, v in s["steps"].items():
        print(f"| {k} | {v}% |")
    print("\n| top functions by self time | share |\n|---|---:|")
    for k, v in s["top_self"]:
        print(f"| `{k}` | {v}% |")


def main(argv: list[str] | None = None) -> int:
    """Profile enqueue and the worker; print markdown summaries."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--backend", choices=("embedded", "redis", "upstash"), default="embedded")
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=0.0002, help="pyinstrument sampling interval, s")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="keep raw profiles here (default: a temporary folder)")
    p.add_argument("--py-spy", action="store_true", help="also sample a real worker process, all threads")
    a = p.parse_args(argv)
    from pyinstrument import Profiler

    import noop_handlers  # noqa: F401 - registers the handlers in this process (in-process burst)
    from burst_worker import write_profile

    out = Path(a.out).resolve() if a.out else None
    stack = open_stack(a.backend, a.ledger, latency_ms=a.latency_ms)
    if out is None:
        out = stack.tmp / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    try:
        # ---------------------------------------------------------- in-process, pyinstrument
        db = stack.database_url("prof")
        q = qkit.connect("prof", database_url=db, **stack.overrides)
        prof = Profiler(interval=a.interval)
        prof.start()
        t0 = time.perf_counter()
        for start in range(0, a.n, a.batch):
            q.enqueue_many([{"type": "noop", "payload": {}} for _ in range(min(a.batch, a.n - start))])
        enq_s = time.perf_counter() - t0
        prof.stop()
        write_profile(prof, str(out / "enqueue"))
        enq = summarise(pyinstrument_samples(prof.last_session), a.top)
        prof = Profiler(interval=a.interval)
        prof.start()
        t0 = time.perf_counter()
        summary = q.work()
        work_s = time.perf_counter() - t0
        prof.stop()
        write_profile(prof, str(out / "work"))
        wrk = summarise(pyinstrument_samples(prof.last_session), a.top)
        q.close()
        head = (f"{a.backend} + {a.ledger}, N = {a.n}, git {_git()}; profiled rates (slowed by the profiler): "
                f"enqueue {a.n / enq_s:,.0f} jobs/s, in-process burst {summary.completed / work_s:,.0f} jobs/s")
        print(f"# Profiles — {head}")
        print_summary("enqueue_many (pyinstrument, in-process)", enq)
        print_summary("q.work() burst (pyinstrument, in-process, burst thread only)", wrk)

        # ---------------------------------------------------------- real worker process, py-spy
        if a.py_spy:
            spy = shutil.which("py-spy")
            if spy is None:
                print("\n(py-spy not installed: pip install py-spy)")
            else:
                db = stack.database_url("spy")
                q = qkit.connect("spy", database_url=db, **stack.overrides)
                for start in range(0, a.n, a.batch):
                    q.enqueue_many([{"type": "noop", "payload": {}} for _ in range(min(a.batch, a.n - start))])
                q.close()
                raw = out / "worker.pyspy.txt"
                proc = subprocess.run([spy, "record", "--threads", "--nonblocking", "-r", "1000", "-f", "raw",
                                       "-o", str(raw), "--", sys.executable, str(BENCH / "burst_worker.py"),
                                       "--queue", "spy"], env=stack.child_env(db), cwd=str(ROOT),
                                      capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                w = json.loads(lines[-1]) if lines else {}
                samples, threads = pyspy_samples(raw)
                total = sum(threads.values()) or 1
                per_thread = ", ".join(f"{t}: {100 * c / total:.0f}%" for t, c in threads.most_common())
                print_summary("worker process (py-spy, all threads, start-up included)", summarise(samples, a.top),
                              f"on-CPU samples per thread: {per_thread}; burst "
                              f"{w.get('t_end', 0) - w.get('t_burst', 0):.2f} s")
                by_thread: dict[str, list[tuple[Stack, float]]] = defaultdict(list)
                for line in raw.read_text().splitlines():
                    body, _, count = line.rpartition(" ")
                    if count.isdigit():
                        frames, name = pyspy_line(body)
                        by_thread[name].append((frames, float(count)))
                for name, group in by_thread.items():
                    if name != "MainThread" and sum(w for _, w in group) >= 0.05 * total:
                        print_summary(f"thread {name} alone (py-spy)", summarise(group, 12))
        print(f"\nraw profiles: {out}" + ("" if a.out else " (deleted at exit: pass --out to keep them)"))
    finally:
        stack.close()  # a profile folder inside the stack's temporary folder goes with it
    return 0


def _git() -> str:
    from throughput import git_state

    return git_state()


if __name__ == "__main__":
    sys.exit(main())

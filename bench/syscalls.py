"""System calls per job of qkit's enqueue and burst worker, counted with ``strace -c -f``.

``python bench/syscalls.py [--n 20000] [--backend embedded|redis] [--ledger sqlite|postgres]``

Each side runs in its own process under ``strace -f -c`` twice: once for ``--n`` jobs and once for none
(the empty queue), so the start-up's own calls (imports, connects, schema checks) cancel out; the
difference divided by ``--n`` is what one job costs in system calls.  The enqueue process calls
``Queue.enqueue_many`` in batches of 10,000 (as ``bench/throughput.py``); the worker is
``bench/burst_worker.py``, ``qkit work`` with the bench's no-op handlers.  Prints one JSON line: calls per
job for each side, in total and for the syscalls that make up most of it (bench/README.md#profiles).
strace slows the processes it traces; the counts, not the times, are the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from throughput import BENCH as _BENCH, open_stack  # noqa: E402

ENQUEUE = """
import sys, qkit
n, queue = int(sys.argv[1]), sys.argv[2]
q = qkit.connect(queue=queue)
for start in range(0, n, 10_000):
    q.enqueue_many([{"type": "noop", "payload": {}} for _ in range(min(10_000, n - start))])
q.close()
"""


def strace_counts(argv: list[str], env: dict[str, str], out: Path) -> dict[str, int]:
    """Run ``argv`` under ``strace -f -c``; calls per syscall name (its summary table)."""
    subprocess.run(["strace", "-f", "-c", "-o", str(out), *argv], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"; skip the header, rules and the total
        if len(parts) >= 5 and parts[0].replace(".", "", 1).isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def per_job(full: dict[str, int], empty: dict[str, int], n: int, top: int = 8) -> dict:
    diff = {k: full.get(k, 0) - empty.get(k, 0) for k in set(full) | set(empty)}
    biggest = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
    return {"total": round(sum(diff.values()) / n, 3),
            "by_call": {k: round(v / n, 4) for k, v in biggest if v > 0}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--backend", choices=("embedded", "redis"), default="embedded")
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    a = p.parse_args(argv)
    if not shutil.which("strace"):
        raise SystemExit("bench: strace is not installed (apt-get install strace)")
    stack = open_stack(a.backend, a.ledger)
    work = Path(tempfile.mkdtemp(prefix="qkit-syscalls-"))
    try:
        res: dict = {"n": a.n, "backend": a.backend, "ledger": a.ledger}
        counts = {}
        for label, n in (("full", a.n), ("empty", 0)):
            queue = f"sys-{label}"
            env = stack.child_env(stack.database_url(label))
            counts["enqueue", label] = strace_counts([sys.executable, "-c", ENQUEUE, str(n), queue], env,
                                                     work / f"enqueue-{label}.txt")
            counts["worker", label] = strace_counts(
                [sys.executable, str(_BENCH / "burst_worker.py"), "--queue", queue], env, work / f"worker-{label}.txt")
        for side in ("enqueue", "worker"):
            res[f"{side}_syscalls_per_job"] = per_job(counts[side, "full"], counts[side, "empty"], a.n)
        res["loadavg_1m"] = round(os.getloadavg()[0], 2)
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

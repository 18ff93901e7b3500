"""What limits per type cost the Redis scripts, in µs per job, in one JSON line.

    python bench/limits_cost.py [--batches 20] [--repeat 12]

Against a throw-away redis-server, the push and claim scripts move the same jobs (1,000 per call;
each claim settles the previous batch as done) on three queues, taken in turn ``--repeat`` times:

* ``no limits``: a queue without limits (what every queue paid before limits existed, plus one
  EXISTS in push and one TYPE in claim inside the scripts);
* ``other type limited``: the queue has a limit, on another type: its enqueues send the job types
  (push types nothing), and its claims take the plain path;
* ``own type limited``: the jobs' own type has a limit that never binds (rate 10^6 per s): push
  records each job's type, and the claim walks ready with the limit checks (the scan path).

Medians of the per-call timings.  The client's command count is the same for all three
(``tests/test_limits.py::test_a_limit_adds_no_redis_command_per_job``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qkit.backends.redis import RedisBackend  # noqa: E402
from qkit.dev.servers import start_redis  # noqa: E402
from qkit.engine.dispatch import Dispatch  # noqa: E402
from qkit.engine.lifecycle import Settlement  # noqa: E402


def one_round(d: Dispatch, batches: int, first_id: int) -> tuple[float, float]:
    """(push µs/job, claim+settle µs/job) for ``batches`` x 1,000 jobs."""
    n = batches * 1000
    t = time.perf_counter()
    for b in range(batches):
        d.push([(first_id + b * 1000 + i, 0, 0, "bench-noop") for i in range(1000)])
    push = time.perf_counter() - t
    settle: list[Settlement] = []
    t = time.perf_counter()
    while True:
        c = d.claim("bench", 30_000, 1000, settle)
        if not c.claimed:
            break
        settle = [Settlement(i, "done", 0, 0) for i in c.claimed]
    claim = time.perf_counter() - t
    return push / n * 1e6, claim / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=20, help="pushes of 1,000 jobs per round")
    p.add_argument("--repeat", type=int, default=12)
    args = p.parse_args(argv)
    server = start_redis(Path(tempfile.mkdtemp(prefix="qkit-limits-cost-")))
    try:
        backend = RedisBackend(server.url)
        setups = {"no limits": None, "other type limited": "other-type", "own type limited": "bench-noop"}
        queues = {}
        for name, limited in setups.items():
            d = Dispatch(backend, f"bench-{len(queues)}")
            if limited:
                d.set_limits({limited: "1000000 1000 0"})
            queues[name] = d
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        next_id = 1
        for _ in range(args.repeat):
            for name, d in queues.items():
                times[name].append(one_round(d, args.batches, next_id))
                next_id += args.batches * 1000
        out = {name: {"push_us_per_job": round(statistics.median(x[0] for x in v), 2),
                      "claim_settle_us_per_job": round(statistics.median(x[1] for x in v), 2)}
               for name, v in times.items()}
        out["jobs_per_round"] = args.batches * 1000
        out["repeat"] = args.repeat
        print(json.dumps(out))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

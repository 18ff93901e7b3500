"""BullMQ (Node): `addBulk` in chunks of 1,000, then one Worker at concurrency 50 drains them.

Same CLI and JSON line as the other peers (common.py), run through ``bench/bullmq.py`` (which installs the
``bullmq`` npm package on first use).  The drain runs in a fresh Node process, its start-up timed as every
other worker's here; a second, "warm" round drains with a Worker in the process that enqueued (no start-up),
reported beside qkit's end to end without its start-up.  Commands are counted with INFO commandstats around
both rounds and halved (the commands inside BullMQ's Lua scripts included, as for every peer); ``cpu_s`` is
the first round's Node processes' CPU plus half the Redis server's over both rounds.
"""
import os
import sys

import redis

from common import cmdstats, delta, parse_args

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bullmq  # noqa: E402  (bench/bullmq.py)

CONCURRENCY = 50


def server_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


if __name__ == "__main__":
    import json

    a = parse_args()
    r = redis.Redis.from_url(a.redis_url)
    r.flushall()
    before, cpu0 = cmdstats(r), server_cpu(r)
    run = bullmq.run("throughput", a.redis_url, a.n, CONCURRENCY, timeout=a.timeout)
    after, cpu1 = cmdstats(r), server_cpu(r)
    used = delta(before, after)
    commands = sum(used.values())  # delta() already leaves out the INFO that took the second snapshot
    res = {"system": "bullmq", "version": run["version"], "config": f"addBulk x1000, Worker concurrency {CONCURRENCY}",
           "n": a.n, "enqueue_single_s": run["enqueue_s"], "enqueue_bulk_s": run["enqueue_s"],
           "bulk_api": "queue.addBulk (chunks of 1,000)", "drain_s": run["drain_s"], "enqueue_s": run["enqueue_s"],
           "jobs_per_s_end_to_end": run["e2e_jobs_per_s"], "jobs_per_s_end_to_end_bulk": run["e2e_jobs_per_s"],
           "jobs_per_s_end_to_end_warm": run["e2e_warm_jobs_per_s"], "drain_warm_s": run["drain_warm_s"],
           "redis_cmds_per_job": commands / a.n / 2, "worker_startup_s": run["worker_startup_s"],
           "cpu_s": run["cpu_s"] + (cpu1 - cpu0) / 2, "cpu_s_node": run["cpu_s"], "cpu_s_redis": (cpu1 - cpu0) / 2}
    r.flushall()
    print(json.dumps(res), flush=True)

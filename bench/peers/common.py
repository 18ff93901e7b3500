"""The common harness of the peer benchmarks (see README.md in this folder).

Each peer script: enqueue N no-op jobs one at a time (timed), optionally again
with its bulk API (timed), then start ONE worker process and time it until the
N-th job body has run.  Redis commands are counted with INFO commandstats
(snapshots around each phase; the snapshot's own INFO call is subtracted).
The job body calls job_done(); it writes a small JSON file when the N-th job
ran, so no Redis command is spent on completion detection.
"""
import argparse, json, os, signal, subprocess, sys, tempfile, threading, time

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
#: where worker logs go: $BENCH_RESULTS_DIR (bench/throughput.py points it at its temp folder) or results/ here
RESULTS = os.environ.get("BENCH_RESULTS_DIR") or os.path.join(HERE, "results")
DEFAULT_URL = "redis://127.0.0.1:6399/0"

# ---------------------------------------------------------------- worker side
_N = int(os.environ.get("BENCH_N", "0"))
_DONE = os.environ.get("BENCH_DONE_FILE")
_lock = threading.Lock()
_count = 0
_first = None


def job_done():
    """Called by every peer's no-op job body (in the worker process)."""
    global _count, _first
    now = time.time()
    with _lock:
        if _first is None:
            _first = now
        _count += 1
        if _count == _N and _DONE:
            tmp = _DONE + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"first": _first, "last": now, "count": _count}, f)
            os.rename(tmp, _DONE)


# ---------------------------------------------------------------- harness side
def parse_args(configs=("default",)):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_URL))
    p.add_argument("--config", default=configs[0], choices=configs)
    p.add_argument("--raw-n", type=int, default=20000,
                   help="LPUSH+RPOP pairs for the same-run raw redis-py rate (0: skip)")
    p.add_argument("--idle-s", type=float, default=0.0,
                   help="after draining, keep the worker idle this long and count its commands")
    p.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args()
    os.environ["BENCH_REDIS_URL"] = a.redis_url  # peer modules read it at import
    return a


def cmdstats(r):
    return {k[len("cmdstat_"):]: v["calls"] for k, v in r.info("commandstats").items()}


def delta(before, after):
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    d["info"] = d.get("info", 0) - 1          # the snapshot that produced `after`
    return {k: v for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v}


def raw_pair_rate(url, n, payload=b"x" * 100):
    """Single connection, no pipeline: n x LPUSH then n x RPOP. Returns pairs/s."""
    r = redis.Redis.from_url(url)
    r.delete("raw:q")
    t0 = time.perf_counter()
    for _ in range(n):
        r.lpush("raw:q", payload)
    t1 = time.perf_counter()
    for _ in range(n):
        r.rpop("raw:q")
    t2 = time.perf_counter()
    r.close()
    return {"raw_lpush_per_s": n / (t1 - t0), "raw_rpop_per_s": n / (t2 - t1),
            "raw_pairs_per_s": n / (t2 - t0)}


def timed(r, fn):
    s0 = cmdstats(r)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, delta(s0, cmdstats(r))


def run_worker(r, argv, n, timeout, idle_s=0.0, env=None, stop_sig=signal.SIGTERM):
    """Start one worker process; return timings and the commands it spent."""
    fd, done = tempfile.mkstemp(prefix="bench-done-")
    os.close(fd)
    os.unlink(done)
    os.makedirs(RESULTS, exist_ok=True)
    log = open(os.path.join(RESULTS, "worker-%s.log" % os.path.basename(argv[0])), "w")
    e = dict(os.environ, BENCH_N=str(n), BENCH_DONE_FILE=done, BENCH_SERVE="1" if idle_s else "0",
             PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    s0 = cmdstats(r)
    t0 = time.time()
    p = subprocess.Popen(argv, cwd=HERE, env=e, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        while not os.path.exists(done):
            if time.time() - t0 > timeout:
                raise RuntimeError("worker did not finish %d jobs in %ss" % (n, timeout))
            if p.poll() is not None and not os.path.exists(done):
                raise RuntimeError("worker exited rc=%s before finishing; see its log in %s" % (p.returncode, RESULTS))
            time.sleep(0.005)
        with open(done) as f:
            d = json.load(f)
        time.sleep(0.1)                     # let the last ack / result write land
        s1 = cmdstats(r)
        out = {"drain_s": d["last"] - t0, "worker_startup_s": d["first"] - t0,
               "steady_jobs_per_s": (n - 1) / max(d["last"] - d["first"], 1e-9),
               "drain_cmds": delta(s0, s1)}
        if idle_s:
            time.sleep(idle_s)
            idle = delta(s1, cmdstats(r))
            out["idle_cmds_per_s"] = sum(idle.values()) / idle_s
            out["idle_cmds"] = idle
        return out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, stop_sig)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        log.close()
        if os.path.exists(done):
            os.unlink(done)


def bench(system, version, config, a, enqueue_single, enqueue_bulk, worker_argv,
          bulk_label=None, worker_env=None, stop_sig=signal.SIGTERM):
    """Run one measurement and print one JSON line."""
    r = redis.Redis.from_url(a.redis_url)
    r.flushall()
    raw = raw_pair_rate(a.redis_url, a.raw_n) if a.raw_n else {}
    r.flushall()
    res = {"system": system, "version": version, "config": config, "n": a.n}
    enq_s, enq_cmds = timed(r, enqueue_single)
    res.update(enqueue_single_s=enq_s, enqueue_single_cmds=enq_cmds)
    if enqueue_bulk:
        r.flushall()
        b_s, b_cmds = timed(r, enqueue_bulk)
        res.update(enqueue_bulk_s=b_s, enqueue_bulk_cmds=b_cmds, bulk_api=bulk_label)
    w = run_worker(r, worker_argv, a.n, a.timeout, a.idle_s, worker_env, stop_sig)
    res.update(w)
    enq_cmd_n = sum(enq_cmds.values())
    drain_cmd_n = sum(w["drain_cmds"].values())
    res["enqueue_s"] = enq_s                       # one-at-a-time API
    res["jobs_per_s_end_to_end"] = a.n / (enq_s + w["drain_s"])
    if enqueue_bulk:
        res["jobs_per_s_end_to_end_bulk"] = a.n / (res["enqueue_bulk_s"] + w["drain_s"])
    res["enqueue_cmds_per_job"] = enq_cmd_n / a.n
    res["drain_cmds_per_job"] = drain_cmd_n / a.n
    res["redis_cmds_per_job"] = (enq_cmd_n + drain_cmd_n) / a.n
    res.update(raw)
    if raw:
        res["ratio_to_raw"] = res["jobs_per_s_end_to_end"] / raw["raw_pairs_per_s"]
    r.flushall()
    r.close()
    print(json.dumps(res), flush=True)
    return res


def chunks(n, size):
    while n > 0:
        yield min(size, n)
        n -= size

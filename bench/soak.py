"""F29, the nemesis soak: jobs through killed workers, restarting and failing-over servers, poison
data, racing admin actions and skewed clocks.

``python bench/soak.py [--seeds 20] [--seed-start 0] [--jobs 500] [--workers 4] [--fail-rate 0.3]
[--ledger sqlite|postgres] [--faults all|none|kill,redis-restart,...] [--json]``

Per seed, on fresh servers (a redis-server with AOF on and, for ``failover``, its replica; a SQLite
file or a fresh PostgreSQL database):

1. two enqueuer processes enqueue ``--jobs`` jobs of ``bench/soak_handlers.py`` (one idempotency
   key each, retried with the same key after an error) during the first seconds; with ``poison``,
   5 % of them carry hostile data (``soak_handlers.POISON_KINDS``).  ``--workers`` burst worker
   processes (``qkit work``, respawned whenever one ends) run them;
2. meanwhile the nemesis (``bench/nemesis.py``) injects the faults chosen by ``--faults`` (all by
   default): SIGKILLs of random workers, Redis restarts, a ledger lock, PostgreSQL restarts, a
   Redis failover; with ``admin``, a replayer and a purger process act on the DLQ; with ``skew``,
   one enqueuer and one worker slot run with their clock ±1 h off (``bench/skewed.py``);
3. the nemesis stops and the workers drain the queue with no faults: until every job in the ledger
   is terminal and Redis holds no ready, delayed or leased entry (bounded by ``--drain-timeout``);
4. ``bench/soak_check.py`` accounts for purges and replays, then :func:`qkit.ops.audit.total_queue`
   checks it Jepsen-style: the ids the enqueuers got back (acknowledged), the ids found by key for
   calls that errored (attempted), and the handler's ``done`` lines (executions).

A seed is valid iff lost = unexpected = unexplained = wasted-success = 0, the audit is clean and no
poison job lost its own error.  Prints a line per seed and totals (or one JSON document with
``--json``); exits 1 if any seed is invalid.  Every server and process it starts is stopped on the
way out, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from nemesis import (DB_LOCK_SECONDS, FAULTS, REDIS_RESTARTS, SKEW_SECONDS, SKEWED, Address,  # noqa: E402
                     Nemesis, WorkerPool, nemesis_plan, parse_faults, start_failover_pair, start_restartable_redis)
from soak_report import SeedResult, totals, totals_line  # noqa: E402 - after the path set-up

QUEUE = "soak"
LEASE_SECONDS = 1.0
#: with PostgreSQL restarts: a live worker rides out an outage shorter than its lease (it retries for
#: 3/4 of it), so the ~1 s restart needs a lease of more than 1.4 s for the promise to apply
PG_RESTART_LEASE_SECONDS = 2.0
BACKOFF_BASE = 0.1
POISON_RATE = 0.05
DOOMED_RATE = 0.03  # with admin: jobs that fail every attempt, so the DLQ has something to replay and purge
ENQUEUERS = 2
ADMIN_OVERTIME = 1.0  # admin actions go on this long past the nemesis window
PROCS = str(BENCH / "soak_procs.py")
__all__ = ["DB_LOCK_SECONDS", "FAULTS", "REDIS_RESTARTS", "run_seed", "run_soak", "main"]


# ============================================================================ one seed
def _worker_env(redis_url: str, database_url: str, home: Path, lease: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QKIT_", "UPSTASH_"))}
    env.update({
        "QKIT_REDIS_URL": redis_url, "QKIT_DATABASE_URL": database_url, "QKIT_HOME": str(home),
        "QKIT_HANDLERS": "soak_handlers", "QKIT_LEASE_SECONDS": str(lease),
        "QKIT_BACKOFF_BASE": str(BACKOFF_BASE), "QKIT_BACKOFF_MAX": "2",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")]),
    })
    return env


def _wait(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``check`` (an exception counts as not yet) until true or ``timeout``; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - e.g. Redis restarting
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _start(args: list[str], env: dict[str, str], err: Path, skew: float = 0.0) -> subprocess.Popen:
    if skew:
        env = {**env, "QKIT_SOAK_CLOCK_SKEW": str(skew)}
    with open(err, "w") as fh:
        return subprocess.Popen([sys.executable, SKEWED, PROCS, *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=fh)


def _finish(proc: subprocess.Popen, what: str, problems: list[str], timeout: float = 120) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        problems.append(f"{what} did not finish in {timeout:.0f} s")
    if proc.returncode:
        problems.append(f"{what} exited {proc.returncode}")


def run_seed(seed: int, *, jobs: int = 500, workers: int = 4, fail_rate: float = 0.3, max_attempts: int = 3,
             database_url: str | None = None, workdir: Path | None = None, window: float = 15.0,
             enqueue_seconds: float = 6.0, burst_seconds: float = 4.0, drain_timeout: float = 90.0,
             faults: frozenset[str] | str = frozenset(FAULTS), postgres: Any = None,
             status: Callable[[str], None] = lambda s: None, keep: bool = False,
             admin_overtime: float = ADMIN_OVERTIME) -> SeedResult:
    """One soak run (see the module docstring); servers and processes are stopped before it returns.

    ``admin_overtime``: how long the admin processes go on acting past the nemesis window (the
    workers still run then, so their replays and purges still race the bursts).

    ``postgres``: the :class:`qkit.dev.servers.Postgres` holding ``database_url``, for ``pg-restart``.
    """
    import qkit
    from qkit.ops.audit import total_queue
    from sqlalchemy import select

    from qkit.ledger import jobs as jobs_table
    from soak_check import account, attempt_outcomes, poison_outcomes, read_actions, story
    from soak_handlers import read_log
    from soak_procs import poison_kind

    faults = parse_faults(faults) if isinstance(faults, str) else frozenset(faults)
    t_start = time.monotonic()
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"qkit-soak-{seed}-"))
    base.mkdir(parents=True, exist_ok=True)
    (base / "workers").mkdir(exist_ok=True)
    log = base / "handler.log"
    database_url = database_url or f"sqlite:///{base / 'ledger.sqlite3'}"
    rng = random.Random(seed)
    skew_rng = random.Random(f"skew-{seed}")
    skews = [skew_rng.choice((-1, 1)) * SKEW_SECONDS for _ in range(2)] if "skew" in faults else [0.0, 0.0]
    poison_rate = POISON_RATE if "poison" in faults else 0.0
    lease = PG_RESTART_LEASE_SECONDS if postgres is not None and "pg-restart" in faults else LEASE_SECONDS
    problems: list[str] = []
    servers: list[Any] = []
    pool: WorkerPool | None = None
    nemesis: Nemesis | None = None
    clients: list[subprocess.Popen] = []
    admins: list[subprocess.Popen] = []
    q = None
    try:
        status("start redis")
        if "failover" in faults:
            redis_server, replica = start_failover_pair(base)
            servers += [redis_server, replica]
        else:
            redis_server, replica = start_restartable_redis(base), None
            servers.append(redis_server)
        address = Address(base / "redis.url", redis_server.url)
        q = qkit.connect(QUEUE, redis_url=redis_server.url, database_url=database_url, home=base,
                         lease_seconds=lease, backoff_base=BACKOFF_BASE)  # creates the tables
        env = _worker_env(redis_server.url, database_url, base, lease)
        actions_file = base / "admin.jsonl"
        if "admin" in faults:
            for role in ("replayer", "purger"):
                admins.append(_start(["admin", "--role", role, "--seed", str(seed), "--start-file",
                                      str(base / "nemesis.t0"), "--seconds", str(window + admin_overtime),
                                       "--address", str(address.path), "--out", str(actions_file)],
                                      env, base / f"{role}.err"))
        acks = [base / f"enqueue{k}.jsonl" for k in range(ENQUEUERS)]
        for k in range(ENQUEUERS):
            clients.append(_start(
                ["enqueue", "--seed", str(seed), "--jobs", str(jobs), "--first", str(k), "--step", str(ENQUEUERS),
                 "--fail-rate", str(fail_rate), "--poison-rate", str(poison_rate),
                 "--doomed-rate", str(DOOMED_RATE if "admin" in faults else 0.0), "--max-attempts",
                 str(max_attempts), "--log", str(log), "--out", str(acks[k]), "--address", str(address.path),
                 "--seconds", str(enqueue_seconds)], env, base / f"enqueuer{k}.err", skew=skews[0] if k == 0 else 0))
        enqueuers = list(clients)
        clients += admins
        # the window opens once the enqueuers are up (a process takes seconds to start on a loaded
        # machine): the faults then land while jobs flow
        if not _wait(lambda: any(p.exists() and p.stat().st_size for p in acks), 60, 0.05):
            problems.append("no enqueue answered within 60 s")
        pool = WorkerPool(workers, env, base / "workers", burst_seconds, QUEUE, skew=skews[1])
        t0 = time.monotonic()
        (base / "nemesis.t0").write_text(repr(t0))
        pool.start()
        nemesis = Nemesis(nemesis_plan(rng, window, faults, postgres is not None), rng, pool, redis_server,
                          database_url, t0, address=address, replica=replica, postgres=postgres, handler_log=log)
        status("nemesis")
        nemesis.start()
        nemesis.join()
        for lock in nemesis.log.db_locks:
            lock.wait()
        nemesis_s = time.monotonic() - t0
        servers += [s for s in (nemesis.redis,) if s not in servers]
        if nemesis.error is not None:
            problems.append(f"nemesis failed: {type(nemesis.error).__name__}: {nemesis.error}")
        if nemesis.redis is not redis_server:  # a failover: the soak's own connection follows it too
            q.close()
            q = qkit.connect(QUEUE, redis_url=nemesis.redis.url, database_url=database_url, home=base,
                             lease_seconds=lease, backoff_base=BACKOFF_BASE)
        status("clients")
        t_clients = time.monotonic()
        for k, proc in enumerate(clients):
            _finish(proc, f"enqueuer {k}" if proc in enqueuers else f"admin process {k - ENQUEUERS}", problems)
        clients_s = time.monotonic() - t_clients
        acked: dict[int, int] = {}
        errored: set[int] = set()
        enqueue_errors = 0
        for path in acks:
            for line in path.read_text().splitlines() if path.exists() else []:
                try:
                    rec = json.loads(line)
                except ValueError:  # a torn last line: the enqueuer was killed mid-write
                    continue
                if "id" in rec:
                    acked[rec["i"]] = rec["id"]
                else:
                    errored.add(rec["i"])
                    enqueue_errors += 1
        # keys whose every call errored: the job may still have landed (ledger committed, answer lost)
        never = sorted(set(range(jobs)) - set(acked))
        keys = [f"soak-{seed}-{i}" for i in never]
        attempted: list[int] = []
        if keys:
            with q.ledger.read_engine.connect() as conn:
                attempted = [int(r[0]) for r in conn.execute(select(jobs_table.c.id).where(
                    jobs_table.c.queue == QUEUE, jobs_table.c.idempotency_key.in_(keys)))]
        attempted += [acked[i] for i in errored if i in acked]

        # drain: no more faults; the workers run until the ledger has nothing active and Redis nothing queued
        status("drain")
        t_drain = time.monotonic()

        def drained() -> bool:
            counts = q.ledger.status_counts(QUEUE)
            if counts["pending"] or counts["processing"]:
                return False
            inv = q.dispatch.inventory()
            return inv.ready + inv.delayed + inv.leased == 0

        is_drained = _wait(drained, drain_timeout, 0.1)
        drain_s = time.monotonic() - t_drain
        if not is_drained:
            problems.append(f"not drained after {drain_timeout:.0f} s")
        status("audit")
        pool.stop()

        rows = read_log(log)
        actions = read_actions(actions_file.read_text().splitlines() if actions_file.exists() else [])
        killed_pids = set(pool.killed)  # by the nemesis: its kills and the failover's
        acc = account(q, rows, actions, killed_pids)
        # the nemesis kills workers; which lost attempts a kill explains, soak_check decides per pid
        report = total_queue(q, [i for i in acked.values() if i not in acc.purged], acc.current,
                             attempted=[i for i in attempted if i not in acc.purged], deaths_expected=True)
        wasted_ids = sorted(set(report.wasted_success) | set(acc.wasted))
        wasted = len(wasted_ids)
        poison_ids = {acked[i]: kind for i in acked if (kind := poison_kind(seed, i, poison_rate))}
        poison_statuses, poison_problems = poison_outcomes(q, poison_ids, acc.purged)
        problems += poison_problems
        att = attempt_outcomes(q, rows, {e.pid: (e.killed, e.code) for e in pool.exits})
        exits = Counter("killed" if e.killed else ("ok" if e.code == 0 else f"exit {e.code}") for e in pool.exits)
        for lock in nemesis.log.db_locks:
            if lock.error:
                problems.append(f"db lock failed: {lock.error}")
        if acc.lost_replays:
            problems.append(f"replayed, then purged before running again: {acc.lost_replays[:20]}")
        if acc.earlier_unexplained:
            problems.append(f"earlier-epoch runs not explained: {acc.earlier_unexplained[:20]}")
        dup_unexplained = {j for j, _, _ in report.unexplained}
        suspects = sorted(set(report.lost) | set(report.unexpected) | dup_unexplained | set(acc.lost_replays)
                          | {f.job_id for f in report.audit.errors if f.job_id is not None}
                          | {j for j, _, _ in acc.earlier_unexplained}
                          | set(wasted_ids))
        stories = {j: story(q, rows, actions, j) for j in suspects[:5]}
        counts = q.ledger.status_counts(QUEUE)
        valid = (report.valid and not acc.lost_replays and not acc.earlier_unexplained and not wasted
                 and not any(p.startswith("poison") for p in problems))
        return SeedResult(
            seed=seed, valid=valid, faults=sorted(faults), acknowledged=report.acknowledged + len(acc.purged & set(acked.values())),
            lost=len(report.lost) + len(acc.lost_replays),
            unexpected=len(report.unexpected), duplicated=len(report.duplicated),
            explained=len([j for j in report.duplicated if j not in dup_unexplained]),
            unexplained=len(report.unexplained) + len(acc.earlier_unexplained), wasted_success=wasted,
            recovered=len(report.recovered), attempted_only=len(never),
            kills=len(nemesis.log.kills), kills_mid_run=len({pid for _, pid in nemesis.log.kills} & att.lost_pids),
            lost_by=att.lost_by, lost_not_started=att.lost_not_started,
            redis_restarts=len(nemesis.log.redis_restarts),
            redis_down_s=round(sum(d for _, d in nemesis.log.redis_restarts), 3),
            db_locks=sum(1 for lock in nemesis.log.db_locks if lock.held is not None),
            db_lock_held_s=round(sum(lock.held or 0 for lock in nemesis.log.db_locks), 3),
            pg_restarts=len(nemesis.log.pg_restarts), pg_down_s=round(sum(d for _, d in nemesis.log.pg_restarts), 3),
            failovers=len(nemesis.log.failovers), failover_kills=nemesis.log.failover_kills,
            admin_actions=acc.actions, admin_refused=acc.refused, replayed=acc.replay_acks,
            replay_runs=acc.earlier, purged=len(acc.purged), lost_replays=acc.lost_replays,
            skewed=(1 if skews[0] else 0) + pool.skewed, poison=len(poison_ids),
            poison_statuses=poison_statuses,
            attempts=att.attempts,
            statuses={k: counts[k] for k in ("pending", "processing", "completed", "failed")},
            executions=sum(1 for r in rows if r.what == "done"), enqueue_errors=enqueue_errors,
            worker_runs=pool.spawned, worker_exits=dict(exits), nemesis_s=round(nemesis_s, 3),
            clients_s=round(clients_s, 3), drain_s=round(drain_s, 3), drained=is_drained,
            wall_s=round(time.monotonic() - t_start, 3), audit_counts=report.audit.counts, problems=problems,
            report={**report.to_dict(), "audit_summary": report.audit.summary(),
                    "nemesis": {"kills": nemesis.log.kills, "kill_misses": nemesis.log.kill_misses,
                                "redis_restarts": nemesis.log.redis_restarts, "db_lock_at": nemesis.log.db_lock_at,
                                "pg_restarts": nemesis.log.pg_restarts, "failovers": nemesis.log.failovers,
                                "skews": skews},
                    "stories": stories, "wasted_success_ids": wasted_ids,
                    "workdir": str(base)})
    finally:
        if nemesis is not None:
            nemesis.halt.set()
            nemesis.join(30)
            for lock in nemesis.log.db_locks:
                lock.kill()
            servers += [s for s in (nemesis.redis, nemesis.replica, *nemesis.retired) if s is not None]
        if pool is not None:
            pool.kill_all()
        for proc in {*clients, *admins}:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if q is not None:
            q.close()
        for server in servers:
            server.stop()
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)


# ============================================================================ many seeds
def run_soak(seeds: list[int], *, ledger: str = "sqlite", progress: bool = True,
             on_result: Callable[[SeedResult], None] | None = None, **kwargs: Any) -> list[SeedResult]:
    """Run the soak for each seed (a PostgreSQL is started once for all seeds with ``ledger='postgres'``)."""
    from tqdm import tqdm

    results: list[SeedResult] = []
    pg = None
    pg_dir = None
    try:
        if ledger == "postgres":
            from qkit.dev.servers import start_postgres

            pg_dir = Path(tempfile.mkdtemp(prefix="qkit-soak-pg-"))
            pg = start_postgres(pg_dir)
        with tqdm(total=len(seeds), unit="seed", desc="soak", file=sys.stderr, disable=not progress) as bar:
            for seed in seeds:
                def status(phase: str, seed: int = seed) -> None:
                    bar.set_postfix_str(f"seed {seed}: {phase}")

                url = pg.database(f"soak_{seed}") if pg is not None else None
                result = run_seed(seed, database_url=url, postgres=pg, status=status, **kwargs)
                results.append(result)
                if on_result is not None:
                    on_result(result)
                bar.update(1)
    finally:
        if pg is not None:
            pg.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds (default 1)")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--fail-rate", type=float, default=0.3)
    ap.add_argument("--max-attempts", type=int, default=3)
    ap.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--window", type=float, default=15.0, help="seconds the nemesis runs (default 15)")
    ap.add_argument("--drain-timeout", type=float, default=90.0)
    ap.add_argument("--faults", default="all", metavar="LIST",
                    help=f"the faults to inject: all (default), none, or a comma list of {','.join(FAULTS)}")
    ap.add_argument("--keep", action="store_true", help="keep each seed's folder (logs, ledger, AOF)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        ap.error(str(exc))
    if args.window < DB_LOCK_SECONDS + 2:
        ap.error(f"--window must be at least {DB_LOCK_SECONDS + 2:.0f} s (the DB lock lasts {DB_LOCK_SECONDS:.0f} s)")
    from tqdm import tqdm

    def show(r: SeedResult) -> None:
        if not args.json:
            tqdm.write(r.line(), file=sys.stdout)
            if not r.valid:
                tqdm.write("  " + r.report["audit_summary"].replace("\n", "\n  "), file=sys.stdout)
                tqdm.write(f"  ids: {json.dumps(r.report['ids'])}", file=sys.stdout)
                for job_id, story in list(r.report["stories"].items())[:2]:  # what happened to the first two
                    tqdm.write(f"  job {job_id}: " + "; ".join(story), file=sys.stdout)
            sys.stdout.flush()  # a line per seed as it ends, also into a pipe or file

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Ctrl-C and SIGTERM (CI cancelling) both unwind through the cleanup of every server and process;
    # SIGINT explicitly, since a shell starting this in the background hands it down ignored
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    results = run_soak(seeds, ledger=args.ledger, on_result=show, jobs=args.jobs, workers=args.workers,
                       fail_rate=args.fail_rate, max_attempts=args.max_attempts, window=args.window,
                       drain_timeout=args.drain_timeout, keep=args.keep, faults=faults)
    tot = totals(results)
    if args.json:
        print(json.dumps({"ledger": args.ledger, "jobs": args.jobs, "workers": args.workers,
                          "fail_rate": args.fail_rate, "totals": tot,
                          "seeds": [asdict(r) for r in results]}, default=str))
    else:
        print(totals_line(tot, args.ledger, faults))
    return 0 if results and all(r.valid for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

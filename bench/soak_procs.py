"""The soak's client processes (``bench/soak.py``): enqueuers and admin actions.

``python bench/soak_procs.py enqueue ...``: enqueue jobs ``i`` (every ``--step``-th from ``--first``),
each under its idempotency key, retrying errors with the same key.  One JSON line per call:
``{"i", "id"}`` when it returned, ``{"i", "error"}`` when it raised.  With ``--poison-rate``, a
seeded share of the jobs carry a poison kind of ``soak_handlers.POISON_KINDS``; with
``--doomed-rate``, a share fail every attempt (plain errors: DLQ material for the admin actions).

``python bench/soak_procs.py admin --role replayer|purger ...``: DLQ actions from a process of its
own, on a seeded schedule for ``--seconds`` from the nemesis' start (read from ``--start-file``, in
``time.monotonic()`` seconds: one clock for every process of the machine): the replayer cycles replay by id, by error fingerprint
and of all; the purger purges the DLQ; at two shared instants both act at once.  One JSON line per action:
``{"action", "t0", "t1", "ids", "error"}`` (monotonic ns, one clock for the machine's processes);
``ids`` is what the action returned: the ids replayed, or the ids the purge deleted (as the
ledger's ``purge_dead`` returned them).

Both re-read the Redis address file (``--address``) after an error and reconnect when it changed:
how a client follows a Redis failover.  Both run under ``bench/skewed.py``, so the soak can shift
one enqueuer's clock.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

QUEUE = "soak"


class Client:
    """A qkit connection that follows the address file."""

    def __init__(self, address: str, give_up: float = 60.0) -> None:
        self.address = Path(address)
        self.url = ""
        self.q = None
        deadline = time.monotonic() + give_up
        while True:  # the nemesis may have a server down right now
            try:
                self.reconnect()
                return
            except Exception:  # noqa: BLE001 - retried until give_up
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def reconnect(self) -> None:
        import qkit

        url = self.address.read_text().strip()
        if url == self.url and self.q is not None:
            return
        old = self.q
        self.q = None
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001 - the old primary is gone
                pass
        self.q = qkit.connect(QUEUE, redis_url=url)
        self.url = url  # only once connected: a failed attempt is tried again at the next error

    def close(self) -> None:
        if self.q is not None:
            self.q.close()


def poison_kind(seed: int, i: int, rate: float) -> str | None:
    from soak_handlers import POISON_KINDS

    rng = random.Random(f"poison-{seed}-{i}")
    return rng.choice(sorted(POISON_KINDS)) if rng.random() < rate else None


def enqueue_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="soak_procs.py enqueue")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--jobs", type=int, required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--fail-rate", type=float, required=True)
    ap.add_argument("--poison-rate", type=float, default=0.0)
    ap.add_argument("--doomed-rate", type=float, default=0.0, help="share of jobs that fail every attempt")
    ap.add_argument("--max-attempts", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--give-up", type=float, default=60.0)
    args = ap.parse_args(argv)
    client = Client(args.address)
    t0 = time.monotonic()
    with open(args.out, "a") as out:
        for i in range(args.first, args.jobs, args.step):
            # spread over --seconds: the enqueue runs while the nemesis does
            ahead = t0 + args.seconds * i / args.jobs - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            payload: dict[str, Any] = {"log": args.log, "seed": args.seed, "fail_rate": args.fail_rate, "i": i}
            kind = poison_kind(args.seed, i, args.poison_rate)
            if kind:
                payload["poison"] = kind
            elif random.Random(f"doomed-{args.seed}-{i}").random() < args.doomed_rate:
                payload["doomed"] = True
            give_up = time.monotonic() + args.give_up
            while True:
                try:
                    job_id = client.q.enqueue("soak", payload, key=f"soak-{args.seed}-{i}",
                                              max_attempts=args.max_attempts)
                except Exception as exc:  # noqa: BLE001 - retried with the same key
                    out.write(json.dumps({"i": i, "error": f"{type(exc).__name__}: {exc}"[:300]}) + "\n")
                    out.flush()
                    if time.monotonic() > give_up:
                        break
                    time.sleep(0.02)
                    _follow(client)
                    continue
                out.write(json.dumps({"i": i, "id": job_id}) + "\n")
                out.flush()
                break
    client.close()
    return 0


def _follow(client: Client) -> None:
    try:
        client.reconnect()
    except Exception:  # noqa: BLE001 - the new address may not answer yet; next error tries again
        pass


def _fingerprint_of_some_dlq_job(q: Any, rng: random.Random) -> str | None:
    from qkit.ledger import fingerprint

    dead = q.dead(limit=200)
    fps = sorted({fingerprint(j.error) for j in dead if j.error})
    return rng.choice(fps) if fps else None


def _purge(q: Any) -> list[int]:
    """``q.purge_dead()``, returning the ids it deleted: what the ledger's purge returned (the
    public call returns only their count)."""
    deleted: list[int] = []
    inner = q.ledger.purge_dead

    def recording(*args: Any, **kwargs: Any) -> Any:
        ids = inner(*args, **kwargs)
        deleted.extend(int(i) for i in ids)
        return ids

    q.ledger.purge_dead = recording
    try:
        result = q.purge_dead()
    finally:
        q.ledger.purge_dead = inner
    return [int(i) for i in result] if isinstance(result, list) else deleted


def _dlq_has_jobs(client: Client) -> bool:
    try:
        return bool(client.q.dead(limit=1))
    except Exception:  # noqa: BLE001 - a server is down: act anyway (the action records the error)
        return True


def admin_plan(role: str, seed: int, start: float, until: float) -> list[tuple[float, str]]:
    """(monotonic time, action) of one admin process, seeded.  Both processes also act at the same
    two "race" instants (a replay of everything against a purge), so the two really collide."""
    rng = random.Random(f"admin-{role}-{seed}")
    shared = random.Random(f"admin-race-{seed}")
    races = [shared.uniform(start + 2.0, until - 1.0) for _ in range(2)]
    plan: list[tuple[float, str]] = []
    t, n = start, 0
    cycle = ["replay-id", "replay-fingerprint", "replay-id", "replay-all"]
    while True:
        t += rng.uniform(0.6, 1.6) if role == "replayer" else rng.uniform(2.0, 4.0)
        if t >= until:
            break
        plan.append((t, cycle[n % len(cycle)] if role == "replayer" else "purge"))
        n += 1
    plan += [(at, "replay-all" if role == "replayer" else "purge") for at in races]
    return sorted(plan)


def admin_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="soak_procs.py admin")
    ap.add_argument("--role", choices=("replayer", "purger"), required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--start-file", required=True,
                    help="holds the nemesis' start (time.monotonic() seconds) once it has begun")
    ap.add_argument("--seconds", type=float, required=True, help="how long to act from that start")
    ap.add_argument("--address", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rng = random.Random(f"admin-pick-{args.role}-{args.seed}")
    client = Client(args.address)
    start_file = Path(args.start_file)
    give_up = time.monotonic() + 120
    # the soak writes the file in place: it can exist and still be empty for a moment
    while not (start_file.exists() and start_file.read_text().strip()) and time.monotonic() < give_up:
        time.sleep(0.05)
    start = float(start_file.read_text())
    until = start + args.seconds
    print(f"admin {args.role}: ready {time.monotonic() - start:+.1f} s into the window", file=sys.stderr)
    with open(args.out, "a") as out:
        plan = admin_plan(args.role, args.seed, start, until)
        for n, (at, action) in enumerate(plan):
            ahead = at - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            elif ahead < -1.0:  # started late (a loaded machine): skip what is long past
                continue
            # an action on an empty DLQ tests nothing: wait for a failed job, until the next action is due
            next_at = plan[n + 1][0] if n + 1 < len(plan) else until
            while not _dlq_has_jobs(client):
                if time.monotonic() >= next_at:
                    break
                time.sleep(0.1)
            else:
                out.write(json.dumps(_act(client, action, rng)) + "\n")
                out.flush()
    client.close()
    return 0


def _act(client: Client, action: str, rng: random.Random) -> dict[str, Any]:
    rec: dict[str, Any] = {"action": action, "t0": time.monotonic_ns(), "ids": [], "error": None}
    try:
        q = client.q
        if action == "purge":
            rec["ids"] = _purge(q)
        elif action == "replay-all":
            rec["ids"] = q.replay_all()
        elif action == "replay-id":
            dead = [j.id for j in q.dead(limit=200)]
            rec["ids"] = q.replay(rng.choice(dead)) if dead else []
        else:
            fp = _fingerprint_of_some_dlq_job(q, rng)
            rec["ids"] = q.replay_fingerprint(fp) if fp else []
    except Exception as exc:  # noqa: BLE001 - a refused or failed action is recorded, not fatal
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        _follow(client)
    rec["t1"] = time.monotonic_ns()
    return rec


def main(argv: list[str]) -> int:
    if argv[:1] == ["enqueue"]:
        return enqueue_main(argv[1:])
    if argv[:1] == ["admin"]:
        return admin_main(argv[1:])
    print("usage: soak_procs.py enqueue|admin ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

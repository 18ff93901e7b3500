"""The Redis side of a queue: the dispatch index.

Redis answers one question fast — which job runs next, and who holds it —
while the SQL ledger stays the source of truth.  Every method here is one
atomic script call (see ``qkit/lua/*.lua``), so a crash between two calls
never leaves a job half-moved.  All keys of a queue share the hash tag
``{<queue>}``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

from qkit.backends.base import Backend
from qkit.engine.lifecycle import Settlement
from qkit.logs import log


#: the largest number of jobs one script call moves; keeps scripts short and
#: Lua's unpack() far below its stack limit
MAX_BATCH = 1000


@dataclass(frozen=True)
class QueueKeys:
    queue: str

    @property
    def all(self) -> list[str]:
        prefix = f"qkit:{{{self.queue}}}:"
        # "clock" is only used with priority aging: scripts that take six keys ignore it; "control" holds
        # the queue's pause flag and the cancel requests of leased jobs (cancel.lua, pause.lua); "limits"
        # and "types" are used by a queue with limits per type (docs/semantics.md#limits-per-type)
        return [prefix + part for part in ("ready", "delayed", "leased", "owners", "dead", "prio", "clock",
                                           "control", "limits", "types")]


@dataclass
class ClaimResult:
    now_ms: int
    reclaimed: dict[int, str] = field(default_factory=dict)  # id -> previous owner's token
    claimed: list[int] = field(default_factory=list)
    fenced: list[int] = field(default_factory=list)
    next_due_ms: int = -1
    ready_count: int = 0
    #: members of the queue's keys that were not job ids, removed by the script (never run)
    malformed: int = 0
    #: the queue is paused: nothing was claimed (settlements were applied)
    paused: bool = False
    #: type -> (jobs passed over, 'rate' or 'concurrency'): held back by the type's limit, still ready
    held: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: Redis TIME of the claim in µs: when the attempts it grants start
    now_us: int = 0


@dataclass
class Renewal:
    """What a lease renewal found: ids no longer held (fenced), and held ids whose cancel was requested."""

    lost: list[int] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)


@dataclass
class Inventory:
    now_ms: int
    ready: int
    delayed: int
    leased: int
    dead: int
    delayed_due: int
    leases_expired: int
    paused: bool = False


@dataclass
class Snapshot:
    now_ms: int
    ready: set[int]
    delayed: dict[int, int]  # id -> due ms
    leased: dict[int, tuple[int, str]]  # id -> (deadline ms, owner)
    dead: set[int]

    def place_of(self, job_id: int) -> str | None:
        for name in ("ready", "delayed", "leased", "dead"):
            if job_id in getattr(self, name):
                return name
        return None


class RedisClock:
    """Redis's clock as this process last saw it, carried forward on the monotonic clock.

    Due times are decided by Redis ``TIME`` inside the scripts (a delay travels
    as a relative number of ms).  The ledger's ``run_at`` is written in Python,
    so it is computed from this estimate: the ``now_ms`` that the last script
    reply returned (push, claim, inventory) plus the monotonic time elapsed since
    that reply arrived.  The error is the reply's transit time (ms) and
    monotonic drift, never the host's wall clock, which may be hours off or
    stepped while a process runs.  Until a first reply arrives :meth:`now` is
    None and callers fall back to the host's clock, then correct (see
    ``Queue._correct_times``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: tuple[float, float] | None = None  # (Redis ms, monotonic s when the reply arrived)
        self._last_ms = 0.0  # the latest time now() returned: it never goes back

    def observe(self, redis_ms: float) -> None:
        """A reply's Redis TIME in ms (a fraction keeps the µs a claim returns)."""
        with self._lock:
            self._seen = (float(redis_ms), time.monotonic())
        if self is not _PROCESS_CLOCK:
            _PROCESS_CLOCK.observe(redis_ms)

    def at(self, mono: float) -> datetime | None:
        """Redis's time at monotonic instant ``mono`` (estimate), or None before any reply."""
        with self._lock:
            seen = self._seen
        if seen is None:
            return None
        ms = seen[0] + (mono - seen[1]) * 1000
        return datetime.fromtimestamp(ms / 1000, timezone.utc)

    def now(self) -> datetime | None:
        """Redis's time now, never earlier than a time this clock returned before.

        A new reply can set the estimate back by the difference of two replies'
        transit times (a loaded host: milliseconds); the ledger's times must not
        run backwards within a process (created <= started <= finished), so the
        estimate holds until it catches up."""
        with self._lock:  # (called twice per job by a burst: no max(), no attribute read twice)
            seen = self._seen
            if seen is None:
                return None
            ms = seen[0] + (time.monotonic() - seen[1]) * 1000
            if ms < self._last_ms:
                ms = self._last_ms
            self._last_ms = ms
        return datetime.fromtimestamp(ms / 1000, timezone.utc)


#: Redis's clock as the latest reply of any queue in this process returned it (see :func:`redis_now`)
_PROCESS_CLOCK = RedisClock()


def redis_now() -> datetime | None:
    """Redis ``TIME`` now, estimated from this process's latest script reply; None before any reply.

    ``qkit.ledger.utcnow`` uses it, so every time the ledger records (created,
    due, started, finished, events) is on the one clock that decides order and
    due-ness, whatever this host's clock says.  A process that talks to several
    Redis servers takes the latest reply's clock (they should agree to ms).
    """
    return _PROCESS_CLOCK.now()


#: a host clock further than this from Redis's has its ledger due times corrected after the fact
CLOCK_SLACK = timedelta(seconds=1)


def _aging_arg(aging_s: float) -> str:
    """The aging setting as the scripts read it (``repr`` keeps every digit of the float)."""
    return repr(float(aging_s)) if aging_s > 0 else "0"


class Dispatch:
    """Atomic operations on one queue's Redis keys."""

    def __init__(self, backend: Backend, queue: str, aging_s: float = 0.0) -> None:
        self.backend = backend
        self.queue = queue
        self.keys = QueueKeys(queue).all
        #: priority aging, seconds of waiting worth one priority level (0: strict priority).
        #: Every process of a queue must use the same value: it decides the ready scores.
        self.aging_s = float(aging_s)
        #: Redis TIME as last returned by a script (due times in the ledger are computed from it)
        self.clock = RedisClock()
        #: send job types with a push: the queue had limits at the last push (push.lua)
        self._typed_push = False

    def push(self, jobs: Iterable[tuple[int, int, int] | tuple[int, int, int, str]], mode: str = "new") -> int:
        """Make jobs pending: (id, priority, delay_ms) or (id, priority, delay_ms, type) each.

        Returns how many were added.  A delay is relative: the script adds it
        to Redis ``TIME``, so whoever pushes, a job is due on Redis's clock.
        Each reply updates :attr:`clock`.  A job whose type has a limit gets
        its type recorded for the claim (jobs pushed without one are typed by
        :meth:`tag_limited`).
        """
        added = 0
        batch: list[tuple] = []
        for item in jobs:
            batch.append(item)
            if len(batch) == MAX_BATCH:
                added += self._push(batch, mode)
                batch = []
        if batch:
            added += self._push(batch, mode)
        return added

    def wake_listener(self) -> Any:
        """A subscription to the wake-ups push.lua publishes (on the channel named like the ready key),
        or None where the backend has none (Upstash): see :meth:`qkit.backends.base.Backend.wake_listener`."""
        return self.backend.wake_listener(self.keys[0])

    def _push(self, batch: Sequence[tuple], mode: str) -> int:
        # the types travel only to a queue with limits (push.lua says when it has them)
        known = all(len(item) == 4 for item in batch)
        typed = self._typed_push and known
        args: list[object] = [mode, _aging_arg(self.aging_s), "1" if typed else "0" if known else "-"]
        if typed:
            for item in batch:
                args += (item[0], item[1], max(0, int(item[2])), item[3])
        else:
            for item in batch:
                args += (item[0], item[1], max(0, int(item[2])))
        added, now_ms, has_limits = self.backend.run("push", self.keys, args)
        self.clock.observe(int(now_ms))
        if int(added) == -1:  # refused untyped: the queue has limits now
            self._typed_push = True
            return self._push(batch, mode)
        self._typed_push = bool(int(has_limits))
        return int(added)

    def claim(self, token: str, lease_ms: int, want: int,
              settlements: Sequence[Settlement] = ()) -> ClaimResult:
        """Settle the previous batch and claim up to ``want`` jobs, in one call."""
        settlements = list(settlements)
        fenced_early: list[int] = []
        while len(settlements) > MAX_BATCH:  # rare: keep each script's argument list bounded
            head, settlements = settlements[:MAX_BATCH], settlements[MAX_BATCH:]
            fenced_early += self.claim(token, lease_ms, 0, head).fenced
        args: list[object] = [token, int(lease_ms), int(want), len(settlements), _aging_arg(self.aging_s)]
        for s in settlements:
            args += [s.job_id, s.action, int(s.delay_ms), s.priority]
        (now, reclaimed, claimed, fenced, next_due, ready_count, malformed, paused, held,
         now_us) = self.backend.run("claim", self.keys, args)
        self.clock.observe(int(now_us) / 1000)  # to the µs: the attempts it grants start then
        pairs = reclaimed or []
        if malformed:
            # written by something other than qkit: only the ledger says what a job is, so nothing ran
            log.warning("queue %s: removed %d malformed Redis entr%s (not job ids) from its keys; nothing ran",
                        self.queue, int(malformed), "y" if int(malformed) == 1 else "ies")
        return ClaimResult(
            now_ms=int(now),
            reclaimed={int(pairs[i]): pairs[i + 1] or "" for i in range(0, len(pairs), 2)},
            claimed=[int(x) for x in claimed or []],
            fenced=fenced_early + [int(x) for x in fenced or []],
            next_due_ms=int(next_due),
            ready_count=int(ready_count),
            malformed=int(malformed),
            paused=bool(int(paused)),
            held={held[i]: (int(held[i + 1]), held[i + 2]) for i in range(0, len(held or []), 3)},
            now_us=int(now_us),
        )

    # ------------------------------------------------------------------ limits per type (the working copy)
    def set_limits(self, specs: dict[str, str]) -> int:
        """Make ``specs`` (type -> ``'<rate> <per_ms> <concurrency>'``) the queue's limits, all of them."""
        args: list[object] = ["replace"]
        for job_type, spec in sorted(specs.items()):
            args += [job_type, spec]
        return int(self.backend.run("limits", self.keys, args))

    def tag_limited(self, job_type: str, job_ids: Sequence[int]) -> int:
        """Record the type of jobs already in Redis (pushed before their type had a limit)."""
        tagged = 0
        ids = list(job_ids)
        for start in range(0, len(ids), MAX_BATCH):
            tagged += int(self.backend.run("limits", self.keys, ["tag", job_type, *ids[start:start + MAX_BATCH]]))
        return tagged

    def recount_limited(self) -> dict[str, int]:
        """Concurrency in use per limited type := its leases held now; returns it."""
        flat = self.backend.run("limits", self.keys, ["recount"]) or []
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def limited_slots(self) -> dict[str, tuple[int, int]]:
        """Per limited type, read at one instant: (leases of it held, slots counted in use)."""
        flat = self.backend.run("limits", self.keys, ["count"]) or []
        return {flat[i]: (int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)}

    def read_limits(self) -> dict[str, str]:
        """The limits hash as Redis holds it (field -> value)."""
        flat = self.backend.run("limits", self.keys, ["read"]) or []
        return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}

    def renew(self, token: str, lease_ms: int, job_ids: Sequence[int]) -> Renewal:
        """Extend held leases; return the ids this token no longer holds and those whose cancel was requested."""
        if not job_ids:
            return Renewal()
        lost, cancel = self.backend.run("renew", [*self.keys[2:4], self.keys[7]], [token, int(lease_ms), *job_ids])
        return Renewal([int(x) for x in lost or []], [int(x) for x in cancel or []])

    def cancel(self, job_id: int, mode: str) -> bool:
        """The Redis half of a cancel (``cancel.lua``): 'remove' a pending job the ledger cancelled from
        ready/delayed, or 'flag' a leased one whose cancel the ledger recorded.  True if it did."""
        return bool(int(self.backend.run("cancel", self.keys, [int(job_id), mode])))

    def set_paused(self, paused: bool) -> bool:
        """Set or clear the queue's pause flag (``pause.lua``); True when that changed it."""
        return bool(int(self.backend.run("pause", [self.keys[7]], ["1" if paused else "0"])))

    def promote(self, job_id: int) -> bool:
        """Make a delayed job ready now, on Redis's clock (``promote.lua``); False if it was not delayed."""
        moved, now_ms = self.backend.run("promote", self.keys, [_aging_arg(self.aging_s), int(job_id)])
        self.clock.observe(int(now_ms))
        return bool(int(moved))

    def remove(self, job_ids: Sequence[int], scope: str = "dead") -> int:
        """Take ids out of the DLQ (scope 'dead') or out of every place (scope 'all')."""
        removed = 0
        ids = list(job_ids)
        for start in range(0, len(ids), MAX_BATCH):
            removed += int(self.backend.run("remove", self.keys, [scope, *ids[start:start + MAX_BATCH]]))
        return removed

    def inventory(self) -> Inventory:
        """Counts per place, in one command."""
        reply = [int(x) for x in self.backend.run("inventory", self.keys, ["counts"])]
        inv = Inventory(*reply[:7], paused=bool(reply[7]) if len(reply) > 7 else False)
        self.clock.observe(inv.now_ms)
        return inv

    def snapshot(self) -> Snapshot:
        """Every id and where it is, in one command (for audit and repair)."""
        now, ready, delayed, leased, dead = self.backend.run("inventory", self.keys, ["full"])
        self.clock.observe(int(now))
        return Snapshot(
            now_ms=int(now),
            ready={int(x) for x in ready or []},
            delayed={int(delayed[i]): int(float(delayed[i + 1])) for i in range(0, len(delayed or []), 2)},
            leased={int(leased[i]): (int(float(leased[i + 1])), leased[i + 2]) for i in range(0, len(leased or []), 3)},
            dead={int(x) for x in dead or []},
        )

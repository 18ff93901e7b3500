"""What if the retries had followed another policy?  Replays recorded failures.

The ledger records, for every job, the outcome and duration of each attempt
(``job_attempts``).  :func:`simulate_queue` runs those recorded sequences through
other retry policies (fixed, linear, exponential, full/equal/decorrelated
jitter, caps, max attempts) and reports, per policy, the time to success,
the extra attempts and the DLQ size each would have given.

The model, and what it assumes:

* An *episode* is one job in one replay epoch that reached an end:
  completed, or dead-lettered.  Episodes still in flight are left out.
* Whether attempt n succeeds depends on n, not on when it runs (as for the
  simulated handlers, docs/semantics.md#interfaces).  So an episode that completed at attempt k
  completes at k under any policy allowing k attempts, and is
  dead-lettered after ``max_attempts`` otherwise.
* Attempts the record never made (a policy allowing more attempts than a
  dead-lettered job got) are *modelled*: with ``assume="model"`` attempt n
  of a type succeeds with the success rate observed for attempt n of that
  type (falling back to the type's retries, the type, then all types, when
  fewer than :data:`MIN_TRIALS` attempts back an estimate); outcomes are then
  expected values (fractional DLQ sizes).  ``assume="fail"`` counts them as
  failures (a lower bound on success).  The summary says how many episodes
  depend on modelled attempts.
* Permanent failures (dead-lettered before using their attempts, e.g. an
  unknown job type) are never retried under any policy.
* Time to success = the attempts' execution times + the back-off delays
  between them, as if each retry ran the moment it was due.  Recorded
  durations are used where they exist, the type's median elsewhere.  The
  ``recorded`` row instead shows the wall-clock time the jobs really took,
  including the time retries waited for a worker burst.
* Jittered delays are drawn from a hash of (job id, epoch, attempt), like
  :class:`qkit.engine.backoff.Backoff`, so ``current`` reproduces the recorded delays
  and every replay gives the same numbers.
* An attempt whose handler named its retry delay (``qkit.Retry(after=)``, a 429/503
  ``Retry-After``: ``job_attempts.retry_after_ms``) is retried after that delay under
  every policy, capped by the policy's cap as qkit caps it by ``QKIT_BACKOFF_MAX``:
  the server said when to come back, whatever the back-off would have said.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from qkit.analysis.policies import DEFAULT_POLICIES, Policy, current_policy, parse_policies
from qkit.analysis.policies import check_policies  # noqa: F401 - the backoff_whatif notebook's parameter check

if TYPE_CHECKING:
    from qkit.engine.queue import Queue

ASSUMPTIONS = ("model", "fail")
#: fewest attempts behind a per-attempt success-rate estimate before falling back to a pooled one
MIN_TRIALS = 5


# ---------------------------------------------------------------- episodes
@dataclass
class Episode:
    """One job in one replay epoch that reached an end."""

    job_id: int
    epoch: int
    type: str
    max_attempts: int
    durations_ms: list[float]
    success_at: int  # the attempt that completed, 0 if none did
    permanent: bool  # dead-lettered before using its attempts: never retried
    observed_tts_s: float | None  # first attempt start to completion, wall clock
    #: per recorded attempt, the retry delay its handler named (s), None where it named none
    retry_after_s: list[float | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.durations_ms)


def episodes(attempts: pd.DataFrame) -> tuple[list[Episode], int]:
    """Finished episodes from an attempts frame (:func:`qkit.analysis.frames.attempts`), and how many are in flight."""
    need = ["job_id", "epoch", "attempt", "type", "outcome", "duration_ms", "started_at", "finished_at",
            "job_status", "job_epoch", "max_attempts"]
    missing = [c for c in need if c not in attempts.columns]
    if missing:
        raise ValueError(f"the attempts frame lacks column(s) {', '.join(missing)}")
    out: list[Episode] = []
    in_flight = 0
    if attempts.empty:
        return out, 0
    df = attempts.sort_values(["job_id", "epoch", "attempt"])
    for (job_id, epoch), g in df.groupby(["job_id", "epoch"], sort=False):
        outcomes = list(g["outcome"])
        if any(o is None or (isinstance(o, float) and np.isnan(o)) for o in outcomes):
            in_flight += 1
            continue
        first = g.iloc[0]
        success_at = outcomes.index("completed") + 1 if "completed" in outcomes else 0
        dead = not success_at and (int(epoch) < int(first["job_epoch"]) or first["job_status"] == "failed")
        if not success_at and not dead:
            in_flight += 1  # failed, retry pending
            continue
        durations = [0.0 if pd.isna(d) else float(d) for d in g["duration_ms"]][: success_at or None]
        named = ([None if pd.isna(v) else float(v) / 1000 for v in g["retry_after_ms"]][: success_at or None]
                 if "retry_after_ms" in g.columns else [])
        observed = None
        if success_at:
            end = g.iloc[success_at - 1]["finished_at"]
            observed = max(0.0, (end - first["started_at"]).total_seconds())
        out.append(Episode(int(job_id), int(epoch), str(first["type"]), int(first["max_attempts"]), durations,
                           success_at, permanent=bool(dead and len(durations) < int(first["max_attempts"])),
                           observed_tts_s=observed, retry_after_s=named))
    return out, in_flight


class _Rates:
    """Per-type, per-attempt success rates, with pooled fall-backs, and typical durations."""

    def __init__(self, eps: Sequence[Episode]) -> None:
        rows = []
        fail_ms: dict[str, list[float]] = {}
        ok_ms: dict[str, list[float]] = {}
        for e in eps:
            if e.permanent:
                continue
            for k, d in enumerate(e.durations_ms, start=1):
                ok = k == e.success_at
                rows.append((e.type, k, ok))
                (ok_ms if ok else fail_ms).setdefault(e.type, []).append(d)
        t = pd.DataFrame(rows, columns=["type", "attempt", "ok"])
        self.table = (t.groupby(["type", "attempt"])["ok"].agg(trials="size", successes="sum").reset_index()
                      if len(t) else pd.DataFrame(columns=["type", "attempt", "trials", "successes"]))
        self.table["trials"] = self.table["trials"].astype("int64")
        self.table["successes"] = self.table["successes"].astype("int64")
        self.table["success_rate"] = self.table["successes"] / self.table["trials"]
        self._cell = {(r.type, int(r.attempt)): (int(r.trials), int(r.successes)) for r in self.table.itertuples()}
        self._type_all: dict[str, tuple[int, int]] = {}
        self._type_retry: dict[str, tuple[int, int]] = {}
        total = [0, 0]
        for (typ, k), (n, s) in self._cell.items():
            a = self._type_all.setdefault(typ, (0, 0))
            self._type_all[typ] = (a[0] + n, a[1] + s)
            if k >= 2:
                r = self._type_retry.setdefault(typ, (0, 0))
                self._type_retry[typ] = (r[0] + n, r[1] + s)
            total[0] += n
            total[1] += s
        self._global = (total[0], total[1])
        all_fail = [d for v in fail_ms.values() for d in v]
        all_ok = [d for v in ok_ms.values() for d in v]
        self._fail_ms = {t: float(np.median(v)) for t, v in fail_ms.items()}
        self._ok_ms = {t: float(np.median(v)) for t, v in ok_ms.items()}
        self._fail_default = float(np.median(all_fail)) if all_fail else 0.0
        self._ok_default = float(np.median(all_ok)) if all_ok else self._fail_default

    def p(self, typ: str, k: int) -> float:
        """Estimated chance that attempt ``k`` of a job of ``typ`` completes."""
        chain = [self._cell.get((typ, k)), self._type_retry.get(typ) if k >= 2 else None,
                 self._type_all.get(typ), self._global]
        for cell in chain:
            if cell and cell[0] >= MIN_TRIALS:
                return cell[1] / cell[0]
        for cell in chain:  # too few anywhere: take what there is
            if cell and cell[0]:
                return cell[1] / cell[0]
        return 0.0

    def fail_ms(self, typ: str) -> float:
        return self._fail_ms.get(typ, self._fail_default)

    def ok_ms(self, typ: str) -> float:
        return self._ok_ms.get(typ, self._ok_default)


# ---------------------------------------------------------------- simulation
@dataclass
class SimOutcome:
    """One episode under one policy: a distribution over outcomes."""

    p_success: float
    p_dlq: float
    attempts: float  # expected attempts made
    times: list[tuple[float, float]]  # (time to success in s, probability)
    modelled: bool  # depends on attempts the record never made


def simulate_episode(e: Episode, policy: Policy, rates: _Rates, assume: str = "model") -> SimOutcome:
    """What ``policy`` would have done with the recorded episode ``e``."""
    limit = policy.max_attempts or e.max_attempts
    if e.permanent:
        return SimOutcome(0.0, 1.0, float(min(e.n, limit)), [], False)
    delays: list[float] = []
    previous = 0.0
    for k in range(1, max(limit, e.n) + 1):
        previous = policy.delay(e.job_id, e.epoch, k, previous)
        named = e.retry_after_s[k - 1] if k <= len(e.retry_after_s) else None
        delays.append(previous if named is None else min(policy.cap, named))
    if e.success_at:
        k = e.success_at
        if k > limit:
            return SimOutcome(0.0, 1.0, float(limit), [], False)
        t = sum(e.durations_ms[:k]) / 1000 + sum(delays[: k - 1])
        return SimOutcome(1.0, 0.0, float(k), [(t, 1.0)], False)
    if limit <= e.n:
        return SimOutcome(0.0, 1.0, float(limit), [], False)
    if assume == "fail":
        return SimOutcome(0.0, 1.0, float(limit), [], True)
    # attempts n+1..limit were never made: weigh them by the observed success rates
    alive = 1.0
    expected = float(e.n)
    t = sum(e.durations_ms) / 1000 + sum(delays[: e.n])
    times: list[tuple[float, float]] = []
    for k in range(e.n + 1, limit + 1):
        h = rates.p(e.type, k)
        expected += alive
        if alive * h > 0:
            times.append((t + rates.ok_ms(e.type) / 1000, alive * h))
        alive *= 1 - h
        t += rates.fail_ms(e.type) / 1000 + delays[k - 1]
    return SimOutcome(1 - alive, alive, expected, times, True)


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of values with probability weights; NaN when the weights sum to 0."""
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    keep = w > 0
    v, w = v[keep], w[keep]
    if not len(v):
        return float("nan")
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cum = np.cumsum(w)
    return float(v[np.searchsorted(cum, q * cum[-1] - 1e-12)])


@dataclass
class WhatIf:
    """The result of :func:`simulate`: summary per policy, per policy and type, per episode, and the rates used."""

    summary: pd.DataFrame
    by_type: pd.DataFrame
    outcomes: pd.DataFrame
    rates: pd.DataFrame
    policies: list[Policy]
    in_flight: int = 0
    assume: str = "model"
    notes: list[str] = field(default_factory=list)


_SUMMARY_COLUMNS = ["policy", "description", "jobs", "completed", "dlq", "success_rate", "attempts",
                    "extra_attempts", "attempts_vs_recorded", "tts_mean_s", "tts_p50_s", "tts_p90_s", "tts_max_s",
                    "modelled_jobs"]


def _stats(policy: str, description: str, rows: list[tuple[Episode, SimOutcome]]) -> dict[str, Any]:
    jobs = len(rows)
    completed = sum(o.p_success for _, o in rows)
    attempts = sum(o.attempts for _, o in rows)
    pairs = [tp for _, o in rows for tp in o.times]
    vals = [t for t, _ in pairs]
    wts = [w for _, w in pairs]
    total_w = sum(wts)
    return {
        "policy": policy, "description": description, "jobs": jobs, "completed": completed,
        "dlq": sum(o.p_dlq for _, o in rows), "success_rate": completed / jobs if jobs else float("nan"),
        "attempts": attempts, "extra_attempts": attempts - jobs,
        "tts_mean_s": sum(t * w for t, w in pairs) / total_w if total_w else float("nan"),
        "tts_p50_s": weighted_quantile(vals, wts, 0.5), "tts_p90_s": weighted_quantile(vals, wts, 0.9),
        "tts_max_s": max(vals) if vals else float("nan"),
        "modelled_jobs": sum(1 for _, o in rows if o.modelled),
    }


def simulate(attempts: pd.DataFrame, policies: Sequence[Any], *, assume: str = "model",
             current: Policy | None = None) -> WhatIf:
    """Replay the episodes of an attempts frame against ``policies`` (see the module docstring)."""
    if assume not in ASSUMPTIONS:
        raise ValueError(f"assume must be one of {', '.join(ASSUMPTIONS)} (got {assume!r})")
    parsed = parse_policies(policies, current)
    eps, in_flight = episodes(attempts)
    rates = _Rates(eps)
    recorded = [(e, SimOutcome(1.0 if e.success_at else 0.0, 0.0 if e.success_at else 1.0, float(e.n),
                            [(e.observed_tts_s, 1.0)] if e.success_at and e.observed_tts_s is not None else [],
                            False)) for e in eps]
    results = {"recorded": recorded}
    for p in parsed:
        results[p.name] = [(e, simulate_episode(e, p, rates, assume)) for e in eps]
    descriptions = {"recorded": "as recorded (wall clock, including waits for a worker)",
                    **{p.name: p.describe() for p in parsed}}
    summary = pd.DataFrame([_stats(name, descriptions[name], rows) for name, rows in results.items()],
                           columns=[c for c in _SUMMARY_COLUMNS if c != "attempts_vs_recorded"])
    recorded_attempts = float(summary.loc[0, "attempts"]) if len(summary) else 0.0
    summary.insert(8, "attempts_vs_recorded", summary["attempts"] - recorded_attempts)
    by_type_rows = []
    for name, rows in results.items():
        for typ in sorted({e.type for e in eps}):
            st = _stats(name, descriptions[name], [(e, o) for e, o in rows if e.type == typ])
            by_type_rows.append({"type": typ, **st})
    by_type = pd.DataFrame(by_type_rows, columns=["type", *[c for c in _SUMMARY_COLUMNS
                                                             if c != "attempts_vs_recorded"]])
    by_type = by_type.drop(columns=["description"])
    outcomes = pd.DataFrame(
        [{"policy": name, "job_id": e.job_id, "epoch": e.epoch, "type": e.type, "recorded_attempts": e.n,
          "recorded_success_at": e.success_at, "permanent": e.permanent, "p_success": o.p_success,
          "p_dlq": o.p_dlq, "attempts": o.attempts,
          "tts_s": (sum(t * w for t, w in o.times) / sum(w for _, w in o.times)) if o.times else float("nan"),
          "modelled": o.modelled} for name, rows in results.items() for e, o in rows])
    notes = [f"{len(eps)} finished episode(s) replayed; {in_flight} still in flight left out."]
    named = sum(1 for e in eps if any(v is not None for v in e.retry_after_s))
    if named:
        notes.append(f"{named} episode(s) had retry delays their handler named (qkit.Retry, a 429/503 Retry-After): "
                     "each policy waits those delays instead of its back-off, capped by its cap.")
    if assume == "model":
        notes.append("Attempts the record never made use the success rate observed for that attempt number "
                     f"and type (pooled when under {MIN_TRIALS} attempts back it): outcomes are expected values.")
    else:
        notes.append("Attempts the record never made are counted as failures: success rates are lower bounds.")
    return WhatIf(summary=summary, by_type=by_type, outcomes=outcomes, rates=rates.table, policies=parsed,
                  in_flight=in_flight, assume=assume, notes=notes)


def simulate_queue(q: "Queue", policies: Sequence[Any] | None = None, *, since: Any = None,
                   assume: str = "model") -> WhatIf:
    """:func:`simulate` on the queue's recorded attempts (one ledger query), against ``policies``.

    ``policies`` defaults to :data:`DEFAULT_POLICIES`; ``"current"`` is the
    queue's own back-off (``q.settings``).  ``since`` keeps jobs enqueued
    since then.
    """
    from qkit.analysis import frames

    current = current_policy(q.settings.backoff_base, q.settings.backoff_max)
    return simulate(frames.attempts(q, since=since), policies or DEFAULT_POLICIES, assume=assume,
                    current=current)

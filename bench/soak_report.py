"""The soak's results (``bench/soak.py``): one seed's counts and line, and the totals over seeds."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class SeedResult:
    seed: int
    valid: bool
    faults: list[str]
    acknowledged: int
    lost: int  # acknowledged jobs not terminal, plus lost replays (soak_check)
    unexpected: int
    duplicated: int
    explained: int
    unexplained: int  # total_queue's, plus executions of earlier epochs that no lost/timeout explains
    wasted_success: int  # jobs failed although a run returned: total_queue's, plus soak_check's lost-not-killed
    recovered: int
    attempted_only: int  # keys whose enqueue never returned an id (found in the ledger by key)
    kills: int
    kills_mid_run: int  # killed workers that held an open attempt (recorded lost by the ledger)
    lost_by: dict[str, int]  # lost attempts by how their worker ended: killed, live, exit N
    lost_not_started: int  # lost attempts whose handler never began (batch-mates of the job in hand)
    redis_restarts: int
    redis_down_s: float
    db_locks: int
    db_lock_held_s: float
    pg_restarts: int
    pg_down_s: float
    failovers: int
    failover_kills: int  # workers SIGKILLed because they were on the dead primary
    admin_actions: dict[str, int]  # per action: calls that returned
    admin_refused: dict[str, int]  # per action: calls that raised (e.g. Conflict: no longer failed)
    replayed: int  # ids returned by replays
    replay_runs: int  # executions in an earlier epoch of a replayed job (explained by the replay)
    purged: int  # ids the purges deleted (accounted for, not lost)
    lost_replays: list[int]  # replayed, then purged before running again
    skewed: int  # processes run with a clock 1 h off
    poison: int  # poison-data jobs acknowledged
    poison_statuses: dict[str, int]  # "kind status" -> jobs
    attempts: dict[str, int]
    statuses: dict[str, int]
    executions: int
    enqueue_errors: int
    worker_runs: int
    worker_exits: dict[str, int]
    nemesis_s: float
    clients_s: float  # waiting for the enqueuers and admin processes after the nemesis stopped
    drain_s: float
    drained: bool
    wall_s: float
    audit_counts: dict[str, int]
    problems: list[str]
    report: dict[str, Any]

    def _lost_by(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.lost_by.items())) or "-"

    def line(self) -> str:
        att = " ".join(f"{k} {v}" for k, v in sorted(self.attempts.items()))
        admin = sum(self.admin_actions.values())
        return (f"seed {self.seed:>3}: {'VALID  ' if self.valid else 'INVALID'} {self.acknowledged} acked · "
                f"lost {self.lost} · unexpected {self.unexpected} · duplicated {self.duplicated} "
                f"({self.explained} explained / {self.unexplained} unexplained) · "
                f"wasted-success {self.wasted_success} · "
                f"recovered {self.recovered} · kills {self.kills} ({self.kills_mid_run} mid-run) · "
                f"lost attempts by {self._lost_by()} ({self.lost_not_started} never started) · "
                f"redis restarts {self.redis_restarts} · db lock {self.db_lock_held_s:.1f} s · "
                f"pg restarts {self.pg_restarts} · failovers {self.failovers} ({self.failover_kills} workers moved) · "
                f"admin actions {admin} ({self.admin_refused and sum(self.admin_refused.values()) or 0} refused; "
                f"replayed {self.replayed}, {self.replay_runs} earlier-epoch runs; purged {self.purged}) · "
                f"skewed processes {self.skewed} · poison jobs {self.poison} · attempts: {att} · {self.wall_s:.1f} s"
                + (f" · audit {self.audit_counts}" if self.audit_counts else "")
                + (f" · PROBLEMS: {'; '.join(self.problems)}" if self.problems else ""))



TOTAL_KEYS = ("acknowledged", "lost", "unexpected", "duplicated", "explained", "unexplained", "recovered",
              "attempted_only", "kills", "kills_mid_run", "lost_not_started", "redis_restarts", "db_locks", "executions",
              "enqueue_errors", "worker_runs", "pg_restarts", "failovers", "failover_kills", "replayed", "replay_runs",
              "purged", "skewed", "poison")


def totals(results: list[SeedResult]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(getattr(r, k) for r in results) for k in TOTAL_KEYS}
    attempts: Counter[str] = Counter()
    lost_by: Counter[str] = Counter()
    admin: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    poison: Counter[str] = Counter()
    for r in results:
        attempts.update(r.attempts)
        lost_by.update(r.lost_by)
        admin.update(r.admin_actions)
        refused.update(r.admin_refused)
        poison.update(r.poison_statuses)
    out.update(wasted_success=sum(r.wasted_success for r in results), admin_actions=dict(sorted(admin.items())),
               admin_refused=dict(sorted(refused.items())), poison_statuses=dict(sorted(poison.items())),
               pg_down_s=round(sum(r.pg_down_s for r in results), 3),seeds=len(results), valid=sum(r.valid for r in results),
               invalid=[r.seed for r in results if not r.valid],
               db_lock_held_s=round(sum(r.db_lock_held_s for r in results), 3),
               redis_down_s=round(sum(r.redis_down_s for r in results), 3),
               attempts=dict(sorted(attempts.items())), lost_by=dict(sorted(lost_by.items())),
               wall_s=round(sum(r.wall_s for r in results), 3),
               wall_s_max=max((r.wall_s for r in results), default=0.0))
    return out



def totals_line(tot: dict[str, Any], ledger: str, faults: frozenset[str]) -> str:
    """The totals, one line (``--json`` prints them as a document instead)."""
    att = " ".join(f"{k} {v}" for k, v in tot["attempts"].items())
    wasted = tot["wasted_success"]
    return (f"totals over {tot['seeds']} seed(s) ({ledger}; faults {','.join(sorted(faults)) or 'none'}): "
            f"valid {tot['valid']}/{tot['seeds']} · "
            f"acknowledged {tot['acknowledged']} · lost {tot['lost']} · unexpected {tot['unexpected']} · "
            f"duplicated {tot['duplicated']} ({tot['explained']} explained / {tot['unexplained']} unexplained) · "
            f"wasted-success {wasted} · "
            f"recovered {tot['recovered']} · kills {tot['kills']} ({tot['kills_mid_run']} mid-run) · lost attempts by "
            f"{', '.join(f'{k} {v}' for k, v in tot['lost_by'].items()) or '-'} ({tot['lost_not_started']} never started) · "
            f"redis restarts {tot['redis_restarts']} · db lock held {tot['db_lock_held_s']:.1f} s · "
            f"pg restarts {tot['pg_restarts']} ({tot['pg_down_s']:.1f} s down) · failovers {tot['failovers']} "
            f"({tot['failover_kills']} workers moved) · admin actions {tot['admin_actions']} "
            f"(refused {tot['admin_refused']}; replayed {tot['replayed']}, {tot['replay_runs']} earlier-epoch runs; "
            f"purged {tot['purged']}) · skewed processes {tot['skewed']} · poison jobs {tot['poison']} "
            f"{tot['poison_statuses']} · attempts: {att} · wall {tot['wall_s']:.1f} s")
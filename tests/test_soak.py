"""F29, the nemesis soak (``bench/soak.py``), for 3 seeds: G1-G8 under faults.

Per seed: 500 jobs with fail_rate 0.3 through 4 burst worker processes while a
nemesis SIGKILLs a random worker every 0.5-3 s, kill -9s and restarts Redis
(AOF on, same port and data dir) twice, and holds the SQLite ledger in
``BEGIN EXCLUSIVE`` for 5 s; then a drain with no faults and the Jepsen
total-queue check.  ``python bench/soak.py --seeds 20`` is the nightly size.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import soak  # noqa: E402

SEEDS = [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_nemesis_soak(seed: int, tmp_path: Path):
    result = soak.run_seed(seed, workdir=tmp_path)
    print(result.line())  # the Jepsen counts, shown with -s or on failure
    detail = f"{result.line()}\n{result.report['audit_summary']}\nids: {result.report['ids']}"
    assert not result.problems, detail
    assert result.drained, detail
    # the nemesis did its work, so the checks below could have failed
    assert result.kills_mid_run >= 1, detail
    assert result.redis_restarts == soak.REDIS_RESTARTS, detail
    assert result.db_locks == 1 and result.db_lock_held_s >= soak.DB_LOCK_SECONDS, detail
    assert result.attempts.get("lost", 0) >= 1, detail
    # total-queue: every acknowledged job terminal, nothing unexpected, every duplicate explained
    assert result.acknowledged == 500, detail
    assert result.lost == 0, detail
    assert result.unexpected == 0, detail
    assert result.unexplained == 0, detail
    assert result.report["audit_errors"] == 0, detail
    assert result.valid, detail
    assert result.statuses["pending"] == result.statuses["processing"] == 0, detail

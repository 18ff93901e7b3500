"""The benchmark harness (bench/) runs end to end at small N and prints what it promises.

No speed is asserted: only that each script starts its own servers, drains
every job, and prints valid JSON with the expected keys.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

THROUGHPUT_KEYS = {
    "system", "backend", "ledger", "n", "concurrency", "completed",
    "enqueue_s", "drain_s", "enqueue_jobs_per_s", "drain_jobs_per_s", "e2e_jobs_per_s",
    "worker_startup_s", "burst_jobs_per_s",
    "redis_cmds_per_job", "redis_cmds_per_job_enqueue", "redis_cmds_per_job_drain",
    "redis_server_cmds_per_job", "redis_server_cmds", "idle_redis_cmds",
    "http_requests_per_job", "ledger_statements_per_job", "sql_calls_per_job",
    "worker_peak_rss_mb", "redis_bytes_per_pending_job",
}


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=timeout)


def _json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("backend,ledger,extra", [
    ("embedded", "sqlite", []),
    ("redis", "postgres", []),
    ("upstash", "sqlite", ["--latency-ms", "1"]),
])
def test_throughput_prints_one_json_line(backend: str, ledger: str, extra: list[str]) -> None:
    proc = _run("throughput.py", "--n", "300", "--backend", backend, "--ledger", ledger, "--idle-s", "0.2", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    res = json.loads(lines[0])
    assert THROUGHPUT_KEYS <= set(res), THROUGHPUT_KEYS - set(res)
    assert res["backend"] == backend and res["ledger"] == ledger and res["n"] == 300
    assert res["completed"] == 300  # every job ran (a correctness check, not a speed one)
    assert res["redis_server_cmds_per_job"] is not None  # the server was reachable by redis-py
    if backend == "upstash":
        assert {"endpoint_requests_per_job", "http_requests"} <= set(res)


def test_throughput_vs_peer() -> None:
    pytest.importorskip("huey")
    assert (BENCH / "peers" / "huey_peer.py").is_file()  # the peers' harness lives in the repository
    proc = _run("throughput.py", "--n", "200", "--backend", "redis", "--ledger", "sqlite", "--idle-s", "0",
                "--vs", "huey")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = _json_lines(proc)
    assert {"e2e_jobs_per_s", "ratio_e2e", "ratio_drain"} <= set(res["vs"]["huey"]), res["vs"]


def test_io_bound_prints_each_concurrency() -> None:
    proc = _run("io_bound.py", "--n", "40", "--sleep-ms", "5", "--concurrency", "1,4", "--json")
    # exit status 1 only means "did not scale", a timing matter this test does not judge
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    lines = _json_lines(proc)
    assert [r["concurrency"] for r in lines[:-1]] == [1, 4]
    assert all(r["completed"] == 40 for r in lines[:-1])
    assert {"drain_jobs_per_s", "speedup", "scales"} <= set(lines[-1])


def test_scaling_prints_a_markdown_table() -> None:
    proc = _run("scaling.py", "--ns", "100,200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "e2e jobs/s" in table[0]


def test_syscalls_counts_a_job_minus_an_empty_run() -> None:
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    proc = _run("syscalls.py", "--n", "400")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = _json_lines(proc)
    for side in ("enqueue", "worker"):
        counts = res[f"{side}_syscalls_per_job"]
        # jobs cost writes to the SQLite ledger's WAL: the difference of the two runs sees them
        assert counts["total"] > 0 and counts["by_call"], res
        assert counts["by_call"].get("pwrite64", 0) > 0, res


def test_python_calls_counts_calls_per_job() -> None:
    proc = _run("python_calls.py", "--n", "300", "--top", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = _json_lines(proc)
    for side in ("enqueue", "burst"):
        assert res[side]["calls_per_job"] > 1 and len(res[side]["most_called_per_job"]) == 5, res

"""Cost accounting: ``q.stats()["cost"]`` and ``qkit stats`` show what this process's work cost.

Checked against a count taken elsewhere: the local Upstash endpoint counts
the requests it served and the commands it sent on to Redis, so the client
side's figures (what Upstash would bill) must match them exactly.
"""
from __future__ import annotations

import json
import secrets

import pytest

import qkit
from qkit.cli import main
from qkit.engine.queue import UPSTASH_USD_PER_100K_COMMANDS

TOKEN = "cost-test-" + secrets.token_hex(8)
COST_KEYS = {"redis_commands", "http_requests", "ledger_statements", "jobs_enqueued_here", "jobs_finished_here",
             "commands_per_job", "requests_per_job", "upstash_usd_per_100k_jobs"}


@qkit.handler("cost-noop", timeout=10)
def _noop(payload: dict) -> None:
    return None


@qkit.handler("cost-fail", timeout=10)
def _fail(payload: dict) -> None:
    raise RuntimeError("always")


@pytest.fixture(scope="module")
def endpoint(module_redis, endpoint_on):
    return endpoint_on(module_redis.url, TOKEN)


def test_cost_per_finished_job_matches_what_the_endpoint_served(endpoint, tmp_path):
    stats = endpoint.app.state.stats
    stats.reset()
    q = qkit.connect("cost.q-1", upstash_url=endpoint.url, upstash_token=TOKEN, home=tmp_path,
                     database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", backoff_base=0)
    try:
        before = q.cost()
        assert before["jobs_finished_here"] == 0 and before["commands_per_job"] is None
        assert before["upstash_usd_per_100k_jobs"] is None
        q.enqueue_many([{"type": "cost-noop", "payload": {"i": i}} for i in range(40)]
                       + [{"type": "cost-fail", "payload": {}, "max_attempts": 2} for _ in range(10)])
        # a deduplicated enqueue is not a new job of this process
        q.enqueue("cost-noop", {"k": 1}, key="same")
        q.enqueue("cost-noop", {"k": 1}, key="same")
        summary = q.work()
        assert (summary.completed, summary.failed, summary.retried) == (41, 10, 10)
        cost = q.stats()["cost"]
        assert set(cost) == COST_KEYS
        assert (cost["jobs_enqueued_here"], cost["jobs_finished_here"]) == (51, 51)
        # the client's counts are the endpoint's counts: every request and command Upstash would bill
        assert cost["http_requests"] == stats.requests
        assert cost["redis_commands"] == stats.commands == q.backend.counters()["commands"]
        assert cost["commands_per_job"] == round(cost["redis_commands"] / 51, 6)
        assert cost["requests_per_job"] == round(cost["http_requests"] / 51, 6)
        assert cost["upstash_usd_per_100k_jobs"] == round(cost["commands_per_job"] * UPSTASH_USD_PER_100K_COMMANDS, 6)
        # one script call per batch, not per job
        assert cost["commands_per_job"] < 1
        assert cost["ledger_statements"] > 0
    finally:
        q.close()


def test_cost_on_a_tcp_backend_has_no_http_requests(module_redis, tmp_path):
    q = qkit.connect("cost-tcp", redis_url=module_redis.url, home=tmp_path,
                     database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    try:
        q.enqueue_many([{"type": "cost-noop", "payload": {}} for _ in range(5)])
        q.work()
        cost = q.cost()
        assert cost["http_requests"] == 0 and cost["requests_per_job"] == 0
        assert cost["jobs_finished_here"] == 5 and cost["commands_per_job"] == round(cost["redis_commands"] / 5, 6)
    finally:
        q.close()


def test_cli_stats_shows_cost(endpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UPSTASH_REDIS_REST_URL", endpoint.url)
    monkeypatch.setenv("UPSTASH_REDIS_REST_TOKEN", TOKEN)
    monkeypatch.setenv("QKIT_HOME", str(tmp_path))
    monkeypatch.setenv("QKIT_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    assert main(["stats", "--queue", "cost-cli", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert set(cost) == COST_KEYS
    # a fresh process that only read the stats: its own commands, no job finished here
    assert cost["jobs_finished_here"] == 0 and cost["commands_per_job"] is None
    assert cost["redis_commands"] >= 0
    assert main(["stats", "--queue", "cost-cli"]) == 0
    human = capsys.readouterr().out
    assert "cost (this process)" in human and "on Upstash - per 100k jobs" in human  # nothing finished here
    assert TOKEN not in human

"""The command line: exit codes, one-line errors, --json, no secrets in messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import Setup, embedded_sqlite_setup


def qkit_cli(setup: Setup | None, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = setup.env() if setup else {k: v for k, v in os.environ.items()}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "qkit.cli", *args], env=base, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def setup(embedded_home, tmp_path):
    """The CLI runs against the embedded server with a fresh SQLite ledger."""
    yield embedded_sqlite_setup(embedded_home, tmp_path, "clitest")


def test_round_trip(setup):
    out = qkit_cli(setup, "enqueue", "web_scraping", "--payload", '{"url": "https://example.org"}', "--priority", "5",
                   "--queue", "clitest")
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout.strip())
    work = qkit_cli(setup, "work", "--queue", "clitest", "--json")
    assert work.returncode == 0 and json.loads(work.stdout)["completed"] == 1
    job = json.loads(qkit_cli(setup, "job", str(job_id), "--queue", "clitest", "--json").stdout)
    assert job["status"] == "completed" and job["attempts_detail"][0]["outcome"] == "completed"
    stats = json.loads(qkit_cli(setup, "stats", "--queue", "clitest", "--json").stdout)
    assert stats["completed"] == 1
    assert json.loads(qkit_cli(setup, "dlq", "list", "--queue", "clitest", "--json").stdout) == []


def test_payload_from_file(setup, tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"prompt": "hi"}')
    out = qkit_cli(setup, "enqueue", "ai_text_generation", "--payload", f"@{f}", "--queue", "clitest")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args,needle", [
    (["enqueue", "Bad"], "job type"),
    (["enqueue", "web_scraping", "--payload", "{nope"], "not valid JSON"),
    (["enqueue", "web_scraping", "--payload", "[1]"], "JSON object"),
    (["enqueue", "web_scraping", "--payload", "@/no/such/file.json"], "cannot be read"),
    (["enqueue", "web_scraping", "--priority", "9999999"], "priority"),
    (["enqueue", "web_scraping", "--max-attempts", "0"], "max_attempts"),
    (["enqueue", "web_scraping", "--queue", "Bad!"], "queue name"),
    (["enqueue", "web_scraping", "--colour", "red"], "No such option"),
    (["job", "999999", "--queue", "clitest"], "no job 999999"),
    (["job", "abc"], "abc"),
    (["dlq", "replay"], "job ids or --all"),
    (["nosuchcommand"], "No such command"),
])
def test_user_errors_are_one_line_exit_2(setup, args, needle):
    out = qkit_cli(setup, *args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr


def test_replay_of_a_job_that_is_not_failed_is_refused(setup):
    job_id = qkit_cli(setup, "enqueue", "web_scraping", "--queue", "clitest").stdout.strip()
    out = qkit_cli(setup, "dlq", "replay", job_id, "--queue", "clitest")
    assert out.returncode == 2 and "not failed" in out.stderr


def test_unreachable_backend_is_one_line_exit_1_without_the_password(tmp_path):
    env = {"QKIT_HOME": str(tmp_path), "QKIT_REDIS_URL": "redis://:s3cret-sentinel@127.0.0.1:1/0",
           "QKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}"}
    out = qkit_cli(None, "enqueue", "web_scraping", env=env)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "QKIT_REDIS_URL" in lines[0]
    assert "s3cret-sentinel" not in out.stderr + out.stdout


@pytest.mark.parametrize("var,value", [
    ("QKIT_REDIS_URL", "http://nope"),
    ("QKIT_REDIS_URL", "redis://host:notaport"),
    ("QKIT_DATABASE_URL", "not a url"),
    ("QKIT_LEASE_SECONDS", "soon"),
    ("UPSTASH_REDIS_REST_URL", "ftp://x"),
])
def test_malformed_configuration_names_the_variable(tmp_path, var, value):
    env = {"QKIT_HOME": str(tmp_path), var: value}
    out = qkit_cli(None, "stats", env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and var in lines[0], out.stderr


def test_an_evicting_redis_gets_one_warning(tmp_path):
    from qkit.dev.servers import start_redis

    server = start_redis(tmp_path / "lru", extra_args=("--maxmemory-policy", "allkeys-lru"))
    try:
        env = {"QKIT_HOME": str(tmp_path), "QKIT_REDIS_URL": server.url,
               "QKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}"}
        out = qkit_cli(None, "enqueue", "web_scraping", env=env)
        assert out.returncode == 0, out.stderr
        warnings = [line for line in out.stderr.splitlines() if "maxmemory-policy" in line]
        assert len(warnings) == 1 and "allkeys-lru" in warnings[0] and "noeviction" in warnings[0]
    finally:
        server.stop()

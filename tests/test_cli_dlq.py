"""`qkit dlq` for people (issue 15): list with a header and useful columns, groups by fingerprint, replay
across queues, and a purge that filters, counts first, asks on a terminal and refuses off one.

The CLI runs as a real subprocess (``python -m qkit``) against the embedded Redis and a SQLite ledger.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from conftest import Setup, embedded_sqlite_setup
from qkit.errors import BadInput
from qkit.ops.audit import audit
from qkit.ops.triage import group_rows


def qkit_cli(setup: Setup, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m qkit ...`` off a terminal (stdin is /dev/null)."""
    return subprocess.run([sys.executable, "-m", "qkit", *args], env=setup.env(QKIT_HANDLERS="dlq_handlers", **env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)


@pytest.fixture
def setup(embedded_home, tmp_path):
    yield embedded_sqlite_setup(embedded_home, tmp_path, "dlqcli")


@pytest.fixture
def dead(setup):
    """A DLQ of 9 jobs in three groups: 5 dlq_order (one raise site, messages differing in numbers, ids,
    UUIDs and hex), 3 dlq_parse, 1 of a type nobody handles."""
    import dlq_handlers  # noqa: F401 - this process's bursts run them too

    q = setup.connect()
    ids = {"order": q.enqueue_many([{"type": "dlq_order", "payload": {"n": n}, "max_attempts": 1} for n in range(5)]),
           "parse": q.enqueue_many([{"type": "dlq_parse", "payload": {"n": n}, "max_attempts": 1} for n in range(3)]),
           "nobody": [q.enqueue("dlq_nobody_knows", {})]}
    q.work()
    assert len(q.dead()) == 9
    return q, ids


def one_line(out: subprocess.CompletedProcess, code: int, needle: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, (out.returncode, out.stderr)
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr


# ---------------------------------------------------------------- list
def test_dlq_list_has_a_header_and_the_failed_at_and_fingerprint_columns(setup, dead):
    q, ids = dead
    out = qkit_cli(setup, "dlq", "list", "--queue", q.name)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "ATTEMPTS", "FAILED", "AT", "(UTC)", "FINGERPRINT", "ERROR"]
    assert len(lines) == 1 + 9
    rows = json.loads(qkit_cli(setup, "dlq", "list", "--queue", q.name, "--json").stdout)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {i for group in ids.values() for i in group}
    first = by_id[ids["order"][0]]
    line = next(x for x in lines[1:] if x.split()[0] == str(first["id"]))
    finished = datetime.fromisoformat(first["finished_at"]).astimezone(timezone.utc)
    assert f"{finished:%Y-%m-%d %H:%M:%S}" in line and first["fingerprint_id"] in line and "ValueError: order" in line
    # newest failure first; --limit cuts and says so
    assert [r["finished_at"] for r in rows] == sorted((r["finished_at"] for r in rows), reverse=True)
    limited = qkit_cli(setup, "dlq", "list", "--queue", q.name, "--limit", "2")
    assert len(limited.stdout.splitlines()) == 1 + 2 + 1 and "--limit" in limited.stdout.splitlines()[-1]


def test_messages_differing_in_numbers_and_ids_are_one_group(setup, dead):
    q, ids = dead
    out = qkit_cli(setup, "dlq", "list", "--group", "--queue", q.name)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split()[:3] == ["FINGERPRINT", "JOBS", "TYPE"]
    groups = json.loads(qkit_cli(setup, "dlq", "list", "--group", "--queue", q.name, "--json").stdout)
    assert sorted((g["type"], g["jobs"]) for g in groups) == [("dlq_nobody_knows", 1), ("dlq_order", 5),
                                                               ("dlq_parse", 3)]
    order = next(g for g in groups if g["type"] == "dlq_order")
    assert order["fingerprint"].startswith("ValueError at dlq_handlers.py:dlq_order > charge: raise ValueError(")
    assert sorted(order["job_ids"]) == ids["order"]
    assert rows[0].split()[:3] == [order["fingerprint_id"], "5", "dlq_order"]  # the largest group first
    assert len({j.error for j in q.dead()}) == 9  # every message differs


def test_a_job_id_is_replayed_in_whatever_queue_holds_it(setup, dead):
    q, ids = dead
    job_id = ids["parse"][0]
    out = qkit_cli(setup, "dlq", "replay", str(job_id))  # no --queue: the queue is 'dlqcli', not 'default'
    assert out.returncode == 0, out.stderr
    assert q.get(job_id).status == "pending"
    one_line(qkit_cli(setup, "dlq", "replay", "999999999"), 2, "no job 999999999")
    one_line(qkit_cli(setup, "dlq", "replay", str(ids["parse"][1]), "--queue", "default"), 2,
             "no job")  # an explicit queue is still obeyed


# ---------------------------------------------------------------- purge
def test_purge_dry_run_counts_and_changes_nothing(setup, dead):
    q, ids = dead
    before = {j.id for j in q.dead()}
    out = qkit_cli(setup, "dlq", "purge", "--dry-run", "--queue", q.name)
    assert out.returncode == 0 and out.stdout.startswith("would purge 9 job(s)"), out.stdout + out.stderr
    fp = next(g for g in group_rows(q) if g["type"] == "dlq_parse")["fingerprint_id"]
    out = qkit_cli(setup, "dlq", "purge", "--dry-run", "--fingerprint", fp, "--queue", q.name, "--json")
    assert json.loads(out.stdout) == {"dry_run": True, "would_purge": 3}
    assert {j.id for j in q.dead()} == before
    assert q.purge_dead(dry_run=True) == 9 and q.purge_dead(fingerprint=fp, dry_run=True) == 3
    assert {j.id for j in q.dead()} == before


def test_purge_off_a_terminal_without_yes_refuses_in_one_line(setup, dead):
    q, _ = dead
    out = qkit_cli(setup, "dlq", "purge", "--queue", q.name)
    one_line(out, 2, "--yes")
    assert out.stdout == "" and len(q.dead()) == 9


def _on_terminal(setup: Setup, answer: str, *args: str) -> subprocess.CompletedProcess:
    """`qkit dlq purge` with its stdin on a pseudo-terminal, answering the question with ``answer``."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "qkit", "dlq", "purge", *args], stdin=slave,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=setup.env(QKIT_HANDLERS="dlq_handlers"))
        os.close(slave)
        os.write(master, (answer + "\n").encode())  # the terminal holds the line until the question reads it
        out, err = process.communicate(timeout=180)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_purge_on_a_terminal_asks_first(setup, dead):
    q, ids = dead
    fp = next(g for g in group_rows(q) if g["type"] == "dlq_order")["fingerprint_id"]
    no = _on_terminal(setup, "n", "--fingerprint", fp, "--queue", q.name)
    assert no.returncode == 0, no.stderr
    assert f"purge 5 job(s) of the DLQ of queue {q.name!r} with fingerprint {fp}, with their history?" in no.stderr
    assert no.stdout.strip() == "nothing purged" and len(q.dead()) == 9
    yes = _on_terminal(setup, "y", "--fingerprint", fp, "--queue", q.name)
    assert yes.returncode == 0 and yes.stdout.startswith("purged 5 job(s)"), yes.stdout + yes.stderr
    assert {j.id for j in q.dead()} == set(ids["parse"] + ids["nobody"])


def test_purge_by_fingerprint_deletes_that_group_with_its_history_only(setup, dead):
    q, ids = dead
    fp = next(g for g in group_rows(q) if g["type"] == "dlq_order")
    out = qkit_cli(setup, "dlq", "purge", "--yes", "--fingerprint", fp["fingerprint_id"], "--queue", q.name, "--json")
    assert json.loads(out.stdout) == {"dry_run": False, "purged": 5}, out.stderr
    assert {j.id for j in q.dead()} == set(ids["parse"] + ids["nobody"])
    assert all(q.ledger.attempts(i) == [] and q.ledger.events(i) == [] for i in ids["order"])
    assert q.ledger.attempts(ids["parse"][0]) != []
    # the full fingerprint text works as well as its short id; Redis and the ledger still agree
    text_fp = next(g for g in group_rows(q) if g["type"] == "dlq_parse")["fingerprint"]
    assert q.purge_dead(fingerprint=text_fp) == 3
    report = audit(q)
    assert report.clean, report.summary()
    assert [j.id for j in q.dead()] == ids["nobody"]


def _age(setup: Setup, job_ids: list[int], days: float) -> None:
    """Make jobs look as if they failed ``days`` ago (the ledger's own column, as written long ago)."""
    path = setup.overrides["database_url"].removeprefix("sqlite:///")
    old = (datetime.now(timezone.utc) - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with sqlite3.connect(path) as conn:
        conn.executemany("UPDATE jobs SET finished_at = ? WHERE id = ?", [(old, i) for i in job_ids])


def test_purge_older_than_keeps_the_recent_failures(setup, dead):
    q, ids = dead
    _age(setup, ids["parse"], 8)
    _age(setup, ids["order"][:2], 2)
    out = qkit_cli(setup, "dlq", "purge", "--yes", "--older-than", "7d", "--queue", q.name)
    assert out.returncode == 0 and out.stdout.startswith("purged 3 job(s)"), out.stdout + out.stderr
    assert "that failed more than 7d ago" in out.stdout
    left = {j.id for j in q.dead()}
    assert left == set(ids["order"] + ids["nobody"])
    assert q.purge_dead(older_than=36 * 3600, dry_run=True) == 2  # seconds from Python
    assert q.purge_dead(older_than=timedelta(days=1)) == 2
    assert {j.id for j in q.dead()} == set(ids["order"][2:] + ids["nobody"])


def test_purge_with_both_filters_takes_what_matches_both(setup, dead):
    q, ids = dead
    _age(setup, ids["order"][:3] + ids["parse"][:1], 10)
    fp = next(g for g in group_rows(q) if g["type"] == "dlq_order")["fingerprint_id"]
    assert q.purge_dead(fingerprint=fp, older_than="1d") == 3
    assert {j.id for j in q.dead()} == set(ids["order"][3:] + ids["parse"] + ids["nobody"])


@pytest.mark.parametrize("args,needle", [
    (["--older-than", "3x"], "not like 30d"),
    (["--older-than", "-1d"], "not like 30d"),
    (["--older-than", "0s"], "must be positive"),
    (["--fingerprint", " "], "fingerprint"),
    (["--dry-run", "--queue", "Bad!"], "queue name"),
    (["--yes", "--colour"], "No such option"),
])
def test_bad_purge_input_is_one_line_exit_2_and_nothing_changes(setup, dead, args, needle):
    q, _ = dead
    out = qkit_cli(setup, "dlq", "purge", "--queue", q.name, *args)
    one_line(out, 2, needle)
    assert out.stdout == "" and len(q.dead()) == 9


def test_purge_arguments_from_python_are_checked(setup, dead):
    q, _ = dead
    for bad in (dict(older_than=-1), dict(older_than="soon"), dict(older_than=float("nan")), dict(older_than=[1]),
                dict(fingerprint="")):
        with pytest.raises(BadInput):
            q.purge_dead(**bad)
    assert len(q.dead()) == 9

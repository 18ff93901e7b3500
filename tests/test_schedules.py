"""Recurring schedules against real Redis and real ledgers (issue 16; docs/semantics.md#schedules).

Each fire time becomes exactly one job under the schedule's ``catch_up`` rule: with a made-up "now" moved
across fire times, the daylight-saving change of Europe/Berlin (2027-10-31) and gaps with no tick; with
three processes ticking each instant at once; and with bursts on Redis's own clock.  Expected fire times
are written out from the calendar, not computed by croniter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event

import qkit
from qkit.engine.cron import job_key
from qkit.errors import BadInput
from qkit.ops.audit import audit

from conftest import wait_for

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def scheduled_jobs(q: qkit.Queue) -> dict[str, list[datetime]]:
    """Per schedule name, the fire times its jobs carry in their idempotency keys, oldest first."""
    out: dict[str, list[datetime]] = {}
    for j in q.jobs(limit=10_000):
        name, _, fire = (j.idempotency_key or "").removeprefix("schedule:").partition("@")
        if fire:
            out.setdefault(name, []).append(datetime.strptime(fire, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC))
    return {k: sorted(v) for k, v in out.items()}


# Three schedules, created at 2027-10-30 12:00Z, ticked at STEPS (a gap between the 5th and 6th step).
# Europe/Berlin falls back on 2027-10-31 at 03:00 CEST (01:00Z): 02:30 local happens twice.
CREATED = at("2027-10-30 12:00")
SCHEDULES = {
    "berlin-daily": ("30 2 * * *", "Europe/Berlin", "all"),
    "berlin-hourly": ("0 * * * *", "Europe/Berlin", "latest"),
    "ny-20min": ("*/20 * * * *", "America/New_York", "skip"),
}
STEPS = ["2027-10-30 23:00", "2027-10-31 00:40", "2027-10-31 01:10", "2027-10-31 01:40", "2027-10-31 02:05",
         "2027-11-01 03:00", "2027-11-01 03:20"]
EXPECTED = {
    # 02:30 CEST = 00:30Z and 02:30 CET = 01:30Z on the 31st, then 01:30Z (CET) on 1 November
    "berlin-daily": ["2027-10-31 00:30", "2027-10-31 01:30", "2027-11-01 01:30"],
    # on the hour, every UTC hour (both 02:00s of the 31st); the latest fire time of each tick that saw one
    "berlin-hourly": ["2027-10-30 23:00", "2027-10-31 00:00", "2027-10-31 01:00", "2027-10-31 02:00",
                      "2027-11-01 03:00"],
    # every 20 minutes; only a tick that saw exactly one fire time since the previous tick enqueues it
    "ny-20min": ["2027-10-31 01:00", "2027-10-31 02:00", "2027-11-01 03:20"],
}


def define(q: qkit.Queue) -> None:
    for name, (expr, tz, catch_up) in SCHEDULES.items():
        q.schedule(name, expr, "web_scraping", {"url": f"https://example.org/{name}"}, priority=2, max_attempts=4,
                   tz=tz, catch_up=catch_up, now=CREATED)


def check_outcome(q: qkit.Queue) -> None:
    assert scheduled_jobs(q) == {name: [at(x) for x in fires] for name, fires in EXPECTED.items()}
    jobs = q.jobs(limit=100)
    assert all((j.type, j.priority, j.max_attempts, j.status) == ("web_scraping", 2, 4, "pending") for j in jobs)
    assert {j.payload["url"] for j in jobs} == {f"https://example.org/{n}" for n in SCHEDULES}
    for j in jobs:  # each fire's job was inserted once: no ticker that lost the race touched its key
        assert [e["event"] for e in q.ledger.events(j.id)] == ["enqueued"]
    by_name = {s["name"]: s for s in q.schedules()}
    assert by_name["berlin-daily"]["next_fire_at"] == at("2027-11-02 01:30")
    assert by_name["berlin-hourly"]["last_fire_at"] == at("2027-11-01 03:00")
    assert by_name["ny-20min"]["next_fire_at"] == at("2027-11-01 03:40")
    assert all(s["last_job_id"] in {j.id for j in jobs} for s in by_name.values())
    report = audit(q)
    assert not report.errors, report.errors
    assert q.stats()["pending"] == sum(len(v) for v in EXPECTED.values())  # and Redis has them all ready


def test_fake_now_across_fires_dst_and_a_gap_yields_one_job_per_fire_time(setup):
    q = setup.connect()
    define(q)
    for step in STEPS:
        q.tick(now=at(step))
        assert q.tick(now=at(step)) == []  # a second tick at the same instant finds nothing
    check_outcome(q)


TICKER = """
import json, os, sys, time
from datetime import datetime
from pathlib import Path
import qkit

q = qkit.connect(queue=sys.argv[1])
folder, steps = Path(sys.argv[2]), json.loads(sys.argv[3])
fired = []
for i, step in enumerate(steps):
    while not (folder / f"go-{i}").exists():
        time.sleep(0.002)
    fired += [r["name"] for r in q.tick(now=datetime.fromisoformat(step + "+00:00"))]
    (folder / f"done-{i}-{os.getpid()}").write_text("")
print(json.dumps(fired))
"""


def test_three_processes_ticking_each_instant_at_once_make_one_job_per_fire_time(setup, tmp_path):
    q = setup.connect()
    define(q)
    procs = [subprocess.Popen([sys.executable, "-c", TICKER, setup.queue, str(tmp_path), json.dumps(STEPS)],
                              env=setup.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        for i in range(len(STEPS)):
            (tmp_path / f"go-{i}").write_text("")  # all three tick this instant together
            wait_for(lambda: len(list(tmp_path.glob(f"done-{i}-*"))) == 3 or any(p.poll() for p in procs),
                     timeout=120, what=f"three ticks of step {i}")
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    fired = [name for out, _ in outs for name in json.loads(out)]
    # a schedule moves on once per step that had fire times, whichever process did it
    assert len(fired) == 3 + 5 + 7, fired  # steps that moved berlin-daily, berlin-hourly, ny-20min (skip moves too)
    check_outcome(q)


def test_bursts_on_redis_clock_enqueue_every_second_once(setup, tmp_path):
    """Three `qkit work` processes at once, on Redis's own clock, after a gap: each fire time one job."""
    q = setup.connect()
    first = q.schedule("each-second", "* * * * * *", "web_scraping", {"url": "https://example.org/s"},
                       catch_up="all")["next_fire_at"]
    wait_for(lambda: q.redis_time() >= first + timedelta(seconds=3), timeout=30, what="three fire times")
    procs = [subprocess.Popen([sys.executable, "-m", "qkit.cli", "work", "--queue", setup.queue, "--json"],
                              env=setup.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    fires = scheduled_jobs(q)["each-second"]
    assert len(fires) >= 4 and fires[0] == first
    assert fires == [first + timedelta(seconds=i) for i in range(len(fires))]  # no fire time missed or doubled
    s = q.schedules()[0]
    assert s["next_fire_at"] == fires[-1] + timedelta(seconds=1) and s["last_fire_at"] == fires[-1]
    assert sum(json.loads(out)["completed"] for out, _ in outs) == len(fires)  # the bursts ran what they enqueued
    assert not audit(q).errors


def test_a_burst_runs_the_job_its_own_tick_enqueued(setup):
    q = setup.connect()
    fire = q.schedule("soon", "* * * * * *", "web_scraping", {"url": "https://example.org/x"},
                      catch_up="latest")["next_fire_at"]
    wait_for(lambda: q.redis_time() >= fire, timeout=30, what="the fire time")
    summary = q.work()
    assert summary.completed == 1
    job = q.jobs()[0]
    assert job.status == "completed" and job.idempotency_key.startswith("schedule:soon@")


def test_a_forever_worker_ticks_every_second_without_a_redis_command_while_idle(setup, tmp_path, request):
    """`qkit work --forever` enqueues each fire time once and runs it; idle, its ticks send Redis nothing."""
    import signal

    from conftest import spawn_burst
    from test_forever import _commands_while

    q = setup.connect()
    worker = spawn_burst(setup, "--forever", "--idle-seconds", "30", log=tmp_path / "worker.out")
    try:
        wait_for(lambda: q.ledger.running_runs(q.name), 60, "the worker's run row")
        first = q.schedule("each-second", "* * * * * *", "web_scraping", {"url": "https://example.org/f"},
                           catch_up="all")["next_fire_at"]
        wait_for(lambda: sum(j.status == "completed" for j in q.jobs()) >= 3, 60, "three fire times run")
        q.unschedule("each-second")
        fires = scheduled_jobs(q)["each-second"]
        assert fires == [first + timedelta(seconds=i) for i in range(len(fires))]
        wait_for(lambda: all(j.status == "completed" for j in q.jobs()), 30, "the last fire's job")
        if setup.name != "upstash-sqlite":  # Upstash polls once per --idle-seconds by design
            assert _commands_while(setup, q, request, 2.5) == 0  # ticking idle: SQL only
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        assert worker.returncode is not None
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def test_a_tick_killed_after_its_commit_loses_and_doubles_nothing(setup):
    """SIGKILL between a fire's commit and its push: the job is in the ledger only; the schedule has moved on,
    so later ticks do not enqueue that fire again, and the next burst's drift check pushes and runs it."""
    q = setup.connect()
    fire = q.schedule("crashy", "* * * * * *", "web_scraping", {"url": "https://example.org/c"},
                      catch_up="latest")["next_fire_at"]
    wait_for(lambda: q.redis_time() >= fire, timeout=30, what="the fire time")
    killed = subprocess.run([sys.executable, "-m", "qkit.cli", "tick", "--queue", setup.queue, "--json"],
                            env=setup.env(QKIT_CRASH_AT="tick.after_ledger"), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9 and "crash point tick.after_ledger" in killed.stderr, killed.stderr
    [job] = q.jobs()
    assert job.status == "pending" and job.idempotency_key.startswith("schedule:crashy@")
    assert set(audit(q).counts) & {"pending_missing", "redis_lost_data"}  # Redis never heard of it
    q.unschedule("crashy")  # no later fire muddles the count
    assert q.tick() == []
    summary = q.work()
    assert summary.completed == 1 and q.get(job.id).status == "completed" and len(q.jobs()) == 1
    assert not audit(q).errors


def test_a_stored_schedule_that_no_longer_reads_is_skipped_and_the_others_fire(setup, caplog):
    """A zone gone from tzdata (the row rewritten here, as an upgrade would leave it): one log line per tick,
    the burst goes on and the queue's other schedules still fire."""
    from qkit.ledger import schedules as table

    q = setup.connect()
    for name in ("broken", "fine"):
        q.schedule(name, "0 * * * *", "web_scraping", {"url": "https://example.org"}, now=CREATED)
    with q.ledger.engine.begin() as conn:
        conn.execute(table.update().where(table.c.queue == q.name, table.c.name == "broken")
                     .values(tz="Gone/Zone", next_fire_at=at("2020-01-01 00:00")))  # due for real bursts too
    fired = q.tick(now=at("2027-10-30 13:30"))
    assert [f["name"] for f in fired] == ["fine"]
    assert "schedule broken cannot fire" in caplog.text and "Gone/Zone" in caplog.text
    assert list(scheduled_jobs(q)) == ["fine"]
    caplog.clear()
    assert q.work().completed == 1  # a burst on Redis's clock ticks past it too
    assert "schedule broken cannot fire" in caplog.text


def _count_sql(q: qkit.Queue) -> list[str]:
    seen: list[str] = []
    for engine in {q.ledger.engine, q.ledger.read_engine}:
        event.listen(engine, "before_cursor_execute",
                     lambda conn, cursor, statement, *a: seen.append(statement.split()[0].upper()))
    return seen


def test_a_tick_with_nothing_due_costs_one_sql_query_and_no_redis_command(setup):
    q = setup.connect()
    for i in range(3):
        q.schedule(f"later-{i}", "0 0 1 1 *", "web_scraping", {"url": "https://example.org"})
    q.tick()  # learns Redis's clock (one command) the first time
    commands = q.backend.counters()["commands"]
    statements = _count_sql(q)
    assert q.tick() == []
    assert [s for s in statements if s not in ("BEGIN", "COMMIT", "ROLLBACK")] == ["SELECT"]
    assert q.backend.counters()["commands"] == commands


def test_redefining_keeps_or_moves_the_next_fire_and_a_stale_compare_and_set_does_nothing(setup):
    q = setup.connect()
    a = q.schedule("r", "0 * * * *", "web_scraping", {"url": "https://example.org/1"}, now=CREATED)
    assert a["next_fire_at"] == at("2027-10-30 13:00")
    b = q.schedule("r", "0 * * * *", "web_scraping", {"url": "https://example.org/2"}, catch_up="all",
                   now=at("2027-10-30 15:30"))
    assert b["next_fire_at"] == a["next_fire_at"] and b["created_at"] == a["created_at"]  # same cron: kept
    assert (b["payload"], b["catch_up"]) == ({"url": "https://example.org/2"}, "all")
    c = q.schedule("r", "15 * * * *", "web_scraping", {"url": "https://example.org/2"}, now=at("2027-10-30 15:30"))
    assert c["next_fire_at"] == at("2027-10-30 16:15")  # a new cron starts after now
    job = qkit.model.new_job("web_scraping", {}, key=job_key("r", at("2027-10-30 16:15")))
    # a ticker that read the schedule before it was redefined (older updated_at) changes nothing
    stale = q.ledger.fire_schedule(q.name, "r", expect_next=c["next_fire_at"], expect_updated=b["updated_at"],
                                   next_fire_at=at("2027-10-30 17:15"), last_fire_at=at("2027-10-30 16:15"),
                                   jobs=[job])
    assert stale is None and q.jobs() == [] and q.schedules()[0]["next_fire_at"] == c["next_fire_at"]
    assert q.unschedule("r") is True and q.unschedule("r") is False and q.schedules() == []


@pytest.mark.parametrize("kwargs, words", [
    ({"cron": "61 * * * *"}, "cron expression"), ({"cron": "0 0 30 2 *"}, "no fire time"),
    ({"tz": "Mars/Base"}, "time zone"), ({"catch_up": "sometimes"}, "catch_up"),
    ({"name": "Bad Name"}, "schedule name"), ({"type": "Bad Type"}, "job type"),
    ({"payload": {"x": float("nan")}}, "payload"),
])
def test_bad_definitions_are_refused_in_one_line_and_store_nothing(setup, kwargs, words):
    q = setup.connect()
    args = {"name": "n", "cron": "* * * * *", "type": "web_scraping", "payload": {}, **kwargs}
    with pytest.raises(BadInput) as e:
        q.schedule(args.pop("name"), args.pop("cron"), args.pop("type"), args.pop("payload"), **args)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert q.schedules() == []


def _cli(setup, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkit.cli", *args, "--queue", setup.queue], env=setup.env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_schedule_add_list_tick_rm(setup):
    if setup.name == "upstash-sqlite":
        pytest.skip("the CLI is the same on every backend; embedded and redis-postgres cover it")
    bad = _cli(setup, "schedule", "add", "x", "--cron", "* * *", "--type", "web_scraping")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "cron expression" in bad.stderr
    for flags, words in ((["--tz", "Nowhere/Land"], "time zone"), (["--catch-up", "never"], "catch_up")):
        out = _cli(setup, "schedule", "add", "x", "--cron", "* * * * *", "--type", "web_scraping", *flags)
        assert (out.returncode, len(out.stderr.strip().splitlines())) == (2, 1) and words in out.stderr
    added = _cli(setup, "schedule", "add", "tick-me", "--cron", "* * * * * *", "--type", "web_scraping",
                 "--payload", '{"url": "https://example.org/cli"}', "--tz", "Europe/Berlin", "--json")
    assert added.returncode == 0, added.stderr
    first = datetime.fromisoformat(json.loads(added.stdout)["next_fire_at"])
    listed = _cli(setup, "schedule", "list")
    assert listed.returncode == 0 and "tick-me" in listed.stdout and "Europe/Berlin" in listed.stdout
    assert "https://example.org/cli" not in listed.stdout  # payloads only with --json
    q = setup.connect()
    wait_for(lambda: q.redis_time() >= first, timeout=30, what="the fire time")
    ticked = _cli(setup, "tick", "--json")
    assert ticked.returncode == 0, ticked.stderr
    [entry] = json.loads(ticked.stdout)
    assert entry["name"] == "tick-me" and datetime.fromisoformat(entry["fires"][0]) >= first
    assert q.get(entry["job_ids"][0]).payload == {"url": "https://example.org/cli"}
    assert q.stats()["pending"] == 1  # tick enqueued and ran nothing
    removed = _cli(setup, "schedule", "rm", "tick-me")
    assert removed.returncode == 0 and "removed" in removed.stdout
    again = _cli(setup, "schedule", "rm", "tick-me")
    assert again.returncode == 2 and "no schedule" in again.stderr


def test_queue_monitor_lists_schedules_with_their_next_fire_times(tmp_path, monkeypatch):
    """The notebook's schedule cell under papermill: names, local next fire times, no payload."""
    pm = pytest.importorskip("papermill")
    import nbformat

    from conftest import ROOT

    home = tmp_path / "home"
    for name in ("QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QKIT_HOME", str(home))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    with qkit.connect(queue="sched") as q:
        q.schedule("nightly", "30 2 * * *", "web_scraping", {"url": "https://secret.example/token=abc"},
                   tz="Europe/Berlin")
        q.enqueue("web_scraping", {"url": "https://example.org"})  # the monitor refuses a queue with no jobs
        nightly = q.schedules()[0]["next_fire_at"]
    out = tmp_path / "monitor.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "queue_monitor.ipynb"), str(out), parameters={"queue": "sched"},
                        kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    [cell] = [c for c in nb.cells if c.get("id") == "queue-monitor-schedules"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)
    local = nightly.astimezone(ZoneInfo("Europe/Berlin")).strftime("%Y-%m-%d %H:%M %Z")
    assert "nightly" in html and local in html and local.endswith(("02:30 CET", "02:30 CEST"))
    assert f"{nightly:%Y-%m-%d %H:%M:%S}" in html
    assert "secret.example" not in json.dumps(nbformat.writes(nb))


def test_http_lists_schedules_to_readers_without_payloads(tmp_path):
    """GET /api/schedules on a real `qkit serve`: readers see the schedules and next fire times, no payload."""
    import secrets

    import httpx

    from qkit.backends.embedded import EmbeddedServer
    from services import serve_home

    admin, reader = "adm-" + secrets.token_hex(16), "rdr-" + secrets.token_hex(16)
    home = tmp_path / "home"
    worker_secret = "wrk-" + secrets.token_hex(16)
    server = serve_home(home, tmp_path / "serve.log", QKIT_API_TOKEN=admin, QKIT_API_READ_TOKEN=reader,
                        WORKER_SECRET=worker_secret)
    try:
        with qkit.connect("sched-http", home=str(home)) as q:
            q.enqueue("web_scraping", {"url": "https://example.org"})  # the ledger knows the queue
            q.schedule("nightly", "30 2 * * *", "web_scraping", {"url": "https://secret.example/t=abc"},
                       tz="Europe/Berlin", catch_up="skip")
            q.schedule("often", "*/5 * * * *", "ai_text_generation", {"prompt": "p"})
            expected = {s["name"]: s for s in q.schedules()}
        get = lambda token, **params: httpx.get(f"{server.url}/api/schedules", params=params,  # noqa: E731
                                                headers={"Authorization": f"Bearer {token}"}, timeout=60)
        reply = get(reader, queue="sched-http")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["queue"] == "sched-http" and "secret.example" not in reply.text
        assert [s["name"] for s in body["schedules"]] == list(expected)  # soonest next fire first
        for s in body["schedules"]:
            want = expected[s["name"]]
            assert datetime.fromisoformat(s["next_fire_at"]) == want["next_fire_at"]
            assert (s["cron"], s["tz"], s["catch_up"], s["type"]) == (want["cron"], want["tz"], want["catch_up"],
                                                                      want["type"])
            assert "payload" not in s
        assert get(admin).json() == {"queue": "default", "schedules": []}
        assert get("nope", queue="sched-http").status_code == 401
        assert get(reader, queue="no-such-queue").status_code == 404
        assert get(reader, queue="Bad Name").json()["field"] == "queue"
        assert get(reader, queue="sched-http", x="1").json()["field"] == "x"

        # an HTTP worker call (cron services, QStash) fires what came due, then runs it
        with qkit.connect(home=str(home)) as served:
            fire = served.schedule("each-second", "* * * * * *", "web_scraping", {"url": "https://example.org/h"})
            wait_for(lambda: served.redis_time() >= fire["next_fire_at"], timeout=30, what="the fire time")
            burst = httpx.post(f"{server.url}/api/workers", headers={"Authorization": f"Bearer {worker_secret}"},
                               json={"max_jobs": 10}, timeout=120)
            assert burst.status_code == 200 and burst.json()["completed"] == 1, burst.text
            [job] = served.jobs()
            assert job.status == "completed" and job.idempotency_key.startswith("schedule:each-second@")
            served.unschedule("each-second")
    finally:
        server.stop()
        EmbeddedServer(home).stop()

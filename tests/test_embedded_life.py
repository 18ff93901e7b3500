"""The embedded server's life: idle exit and restart, a deleted home, racing restarts, a busy worker,
a copied home, private files (issues 18 and 12: items 8, 10)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

import qkit
from qkit.backends.embedded import EmbeddedServer, running_servers
from qkit.runs.runner import QueueLock

ROOT = Path(__file__).resolve().parent.parent
BACKEND_VARIABLES = ("QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_DATABASE_URL")


def env_for(home: Path, **extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARIABLES}
    env.update(QKIT_HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(home: Path, *args: str, **extra: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkit.cli", *args], env=env_for(home, **extra),
                          capture_output=True, text=True, timeout=120)


def processes_of(home: Path) -> list[tuple[int, str, str]]:
    """The embedded servers and watchdogs whose data folder is ``home/redis``."""
    folder = str(home / "redis")
    return [p for p in running_servers() if p[2] == folder or p[2] == folder + " (deleted)"]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in BACKEND_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "h"
    yield path
    EmbeddedServer(path).stop()
    wait_for(lambda: not processes_of(path), 30, "the server and its watchdog to exit")


def test_idle_server_exits_after_its_last_client_and_comes_back_with_every_job(home, monkeypatch):
    monkeypatch.setenv("QKIT_EMBEDDED_IDLE_SECONDS", "2")
    with qkit.connect(home=home) as q:
        ids = q.enqueue_many([{"type": "web_scraping", "payload": {"i": i}} for i in range(50)])
        pid = EmbeddedServer(home).pid()
        time.sleep(3)  # a connected client, even an idle one, keeps it
        assert EmbeddedServer(home).pid() == pid
    assert {p[1] for p in processes_of(home)} == {"server", "watchdog"}
    waited = wait_for(lambda: not processes_of(home), 60, "the idle server and its watchdog to exit")
    assert waited >= 1.0  # not before the idle time (2 s after the last client left)
    assert "Calling fsync() on the AOF file" in (home / "redis" / "server.log").read_text()
    out = cli(home, "enqueue", "web_scraping", "--payload", "{}", QKIT_EMBEDDED_IDLE_SECONDS=2)
    assert out.returncode == 0, out.stderr
    ids.append(int(out.stdout.strip()))
    with qkit.connect(home=home) as q:
        assert EmbeddedServer(home).pid() not in (None, pid)  # a new server, from the same data
        assert q.dispatch.snapshot().ready == set(ids)
        assert q.stats()["pending"] == 51


def test_server_of_a_deleted_home_exits_promptly(home, monkeypatch):
    monkeypatch.setenv("QKIT_EMBEDDED_IDLE_SECONDS", "0")  # never idle: only the deletion stops it
    with qkit.connect(home=home) as q:
        q.enqueue("web_scraping", {})
    assert len(processes_of(home)) == 2
    shutil.rmtree(home)
    waited = wait_for(lambda: not processes_of(home), 30, "the homeless server to exit")
    assert waited < 5, f"took {waited:.1f} s"


RACER = """
import random, sys, time, qkit
for i in range(int(sys.argv[1])):
    with qkit.connect() as q:
        print(q.enqueue("web_scraping", {"racer": sys.argv[2], "i": i}), flush=True)
    time.sleep(random.uniform(0, 1.2))
"""


def test_processes_racing_restarts_end_with_one_server_and_every_job(home, monkeypatch):
    """Idle time 0.5 s: the server stops and restarts many times under four processes coming and going."""
    monkeypatch.setenv("QKIT_EMBEDDED_IDLE_SECONDS", "0.5")
    with qkit.connect(home=home) as q:
        q.backend.ping()
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(sum(1 for p in processes_of(home) if p[1] == "server"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        env = env_for(home, QKIT_EMBEDDED_IDLE_SECONDS=0.5)
        procs = [subprocess.Popen([sys.executable, "-c", RACER, "12", str(n)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for n in range(4)]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        stop.set()
        sampler.join()
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    ids = {int(line) for out, _ in outs for line in out.split()}
    assert len(ids) == 48
    assert max(seen) == 1, "two servers for one home at once"
    starts = (home / "redis" / "server.log").read_text().count("Ready to accept connections")
    assert starts >= 3, f"only {starts} start(s): the restarts were not exercised"
    with qkit.connect(home=home) as q:
        assert q.dispatch.snapshot().ready == ids
        assert q.stats()["pending"] == 48
    assert sum(1 for p in processes_of(home) if p[1] == "server") == 1


def test_a_worker_mid_burst_keeps_the_server_alive(home, monkeypatch, tmp_path):
    monkeypatch.setenv("QKIT_EMBEDDED_IDLE_SECONDS", "1")
    log = tmp_path / "log"
    with qkit.connect(home=home) as q:
        ids = q.enqueue_many([{"type": "record", "payload": {"log": str(log), "sleep": 0.8}} for _ in range(6)])
        pid = EmbeddedServer(home).pid()
        worker = subprocess.Popen([sys.executable, "-m", "qkit.cli", "work", "--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=env_for(home, QKIT_EMBEDDED_IDLE_SECONDS=1, QKIT_HANDLERS="job_handlers"))
        wait_for(lambda: log.exists(), 60, "the worker's first job")
    # from here the worker is the only client, for ~5 s: 5 times the idle time
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert '"completed": 6' in out
    assert "User requested shutdown" not in (home / "redis" / "server.log").read_text()
    assert EmbeddedServer(home).pid() == pid  # the same server served the whole burst
    with qkit.connect(home=home) as q:
        assert all(q.get(i).status == "completed" for i in ids)


def test_a_copied_home_gets_its_own_server_and_never_stops_the_original(home, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_EMBEDDED_IDLE_SECONDS", "0")
    with qkit.connect(home=home) as q:
        first = q.enqueue("web_scraping", {"where": "original"})
        original = EmbeddedServer(home).pid()
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
        try:
            out = cli(copy, "dev", "stop-embedded")
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == f"no embedded server running for {copy}"
            assert EmbeddedServer(home).pid() == original
            with qkit.connect(home=copy) as c:
                mine = EmbeddedServer(copy).pid()
                assert mine not in (None, original)
                assert os.path.samefile(c.backend.client.config_get("dir")["dir"], copy / "redis")
                assert c.dispatch.snapshot().ready == {first}  # the copy's own data
                c.enqueue("web_scraping", {"where": "copy"})
            assert q.dispatch.snapshot().ready == {first}  # the original's Redis did not drift
            out = cli(copy, "dev", "stop-embedded")
            assert out.stdout.strip() == f"stopped embedded server pid {mine} (home {copy})"
            assert EmbeddedServer(home).pid() == original
            q.backend.ping()
        finally:
            EmbeddedServer(copy).stop()
            wait_for(lambda: not processes_of(copy), 30, "the copy's server to exit")
    out = cli(home, "dev", "stop-embedded")
    assert out.stdout.strip() == f"stopped embedded server pid {original} (home {home})"


def _not_private(home: Path) -> list[str]:
    wrong = []
    for folder, dirs, files in os.walk(home):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            st = os.lstat(name)
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if stat.S_IMODE(st.st_mode) != want:
                wrong.append(f"{oct(stat.S_IMODE(st.st_mode))} {name}")
    return wrong


def test_home_is_private_after_init_and_a_burst(home, tmp_path):
    out = cli(home, "init")
    assert out.returncode == 0, out.stderr
    assert f"data {home / 'redis'}" in out.stdout and "exits after 900 s with no client" in out.stdout
    assert _not_private(home) == []
    log = tmp_path / "log"
    with qkit.connect(home=home) as q:
        q.enqueue_many([{"type": "record", "payload": {"log": str(log)}} for _ in range(20)])
        out = cli(home, "work", QKIT_HANDLERS="job_handlers")
        assert out.returncode == 0, out.stderr
        assert (home / "ledger.sqlite3-wal").exists()  # still open here: the WAL files are there
        assert _not_private(home) == []
    QueueLock(home, "default").acquire({"pid": os.getpid()}).release()  # the scheduled runner's lock
    assert (home / "locks").is_dir()
    assert _not_private(home) == []


def test_an_existing_home_is_made_private_on_next_use(home):
    with qkit.connect(home=home) as q:
        q.enqueue("web_scraping", {})
    EmbeddedServer(home).stop()
    for folder, dirs, files in os.walk(home):  # as qkit left homes before: 0755 folders, 0644 files
        os.chmod(folder, 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)
    with qkit.connect(home=home) as q:
        assert q.stats()["pending"] == 1
        assert _not_private(home) == []


def test_the_password_is_on_no_command_line(home, monkeypatch):
    """Sampled all along three start-ups: the password is in a 0600 config file, not in argv."""
    monkeypatch.setenv("QKIT_EMBEDDED_IDLE_SECONDS", "0")
    home.mkdir(mode=0o700)
    (home / "redis").mkdir(mode=0o700)
    password = EmbeddedServer(home)._password().encode()
    found: list[str] = []
    stop = threading.Event()

    def scan() -> None:
        while not stop.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        if password in Path(entry.path, "cmdline").read_bytes():
                            found.append(entry.name)
                    except OSError:
                        pass

    scanner = threading.Thread(target=scan)
    scanner.start()
    try:
        for _ in range(3):
            with qkit.connect(home=home) as q:
                q.backend.ping()
            EmbeddedServer(home).stop()
    finally:
        stop.set()
        scanner.join()
    assert found == []
    conf = home / "redis" / "server.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and password in conf.read_bytes()


def test_a_live_server_is_never_doubled_when_its_address_file_is_lost(home, monkeypatch):
    """As if its starter died before the server answered: the next start finds the live server
    of this home by its pid file and never starts a second one on the same append-only file."""
    monkeypatch.setenv("QKIT_EMBEDDED_IDLE_SECONDS", "0")
    with qkit.connect(home=home) as q:
        ids = q.enqueue_many([{"type": "web_scraping", "payload": {"i": i}} for i in range(10)])
    (home / "redis" / "server.json").unlink()
    with qkit.connect(home=home) as q:
        assert sum(1 for p in processes_of(home) if p[1] == "server") == 1
        assert q.dispatch.snapshot().ready == set(ids)

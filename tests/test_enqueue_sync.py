"""An enqueue on the SQLite ledger pushes its job to Redis before it flushes the ledger's log, and returns
only after the flush (docs/semantics.md#the-promise, docs/reliability.md).

Watched from outside with strace in a real process: between two marks the enqueue writes to stdout,
its system calls must be the Redis push (the EVALSHA of push.lua on the server's socket), then an
fsync of the ledger's ``-wal`` file, then the return (the second mark).  A commit with
``synchronous=FULL`` would fsync the log before the push.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import embedded_sqlite_setup

SCRIPT = """
import os, qkit
q = qkit.connect(queue="syncq")
q.enqueue("noop", {"warm": 1})  # the first call loads the scripts and opens the connections
if os.environ.get("CHDIR_AWAY"):
    os.chdir("/")  # a relative ledger path must still name the same log
os.write(1, b"MARK-BEFORE\\n")
job_id = q.enqueue("noop", {"n": 2})
os.write(1, b"MARK-ACKED\\n")
print(job_id)
q.close()
"""


@pytest.fixture
def setup(embedded_home, tmp_path):
    return embedded_sqlite_setup(embedded_home, tmp_path, "syncq")


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-path", "relative-path-then-chdir"])
def test_enqueue_pushes_then_flushes_the_log_then_returns(setup, tmp_path, relative):
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    setup.connect()  # the embedded server runs before the traced process (strace -f would follow its start)
    env = setup.env()
    if relative:  # QKIT_DATABASE_URL relative to the directory the process started in, which it then leaves
        env.update(QKIT_DATABASE_URL="sqlite:///ledger.sqlite3", CHDIR_AWAY="1")
    log = tmp_path / "strace.txt"
    proc = subprocess.run(["strace", "-f", "-qq", "-y", "-s", "48", "-o", str(log),
                           "-e", "trace=fsync,fdatasync,sendto,sendmsg,write,writev", sys.executable, "-c", SCRIPT],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "MARK-BEFORE" in line)
    end = next(i for i, line in enumerate(lines) if "MARK-ACKED" in line)
    window = lines[start + 1:end]
    push = [i for i, line in enumerate(window) if "EVALSHA" in line.upper()]
    flush = [i for i, line in enumerate(window) if ("fsync(" in line or "fdatasync(" in line) and "-wal" in line]
    assert push, "\n".join(window)
    assert flush, "\n".join(window)  # the acknowledgment waited for the log to reach the disk
    assert min(flush) > min(push), "\n".join(window)  # ... but the push did not
    # and the job is in the ledger, pending, as acknowledged
    job = setup.connect().get(int(proc.stdout.split()[-1]))
    assert (job.status, job.payload) == ("pending", {"n": 2})

"""A timed-out handler's clean-up kills its own children only (issue 12 item 9).

``qkit serve`` runs several bursts in one process, and a burst with
``--concurrency`` runs several handlers at once: when one handler passes its
timeout, the processes it started are killed, and an innocent job's child
started meanwhile by another handler thread lives on.
"""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import psutil
import pytest

import qkit

RELEASE = threading.Event()  # lets the abandoned handler threads end with the test


@qkit.handler("t9_hang", timeout=2.0)
def hang_with_a_child(payload: dict) -> None:
    child = subprocess.Popen(["sleep", "60"])
    Path(payload["child"]).write_text(str(child.pid))
    RELEASE.wait(120)


@qkit.handler("t9_innocent", timeout=60)
def innocent_with_a_child(payload: dict) -> dict:
    started = Path(payload["wait_for"])
    for _ in range(6000):  # start once the hanging job is running: its clean-up comes 2 s later
        if started.exists():
            break
        threading.Event().wait(0.01)
    child = subprocess.Popen(["sleep", "4"])
    return {"returncode": child.wait()}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_timeout_kills_its_own_child_and_spares_another_bursts(embedded_home: Path, tmp_path: Path,
                                                               concurrency: int):
    db = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    hung_q = qkit.connect(f"t9-hang-{concurrency}", home=embedded_home, database_url=db, backoff_base=0)
    calm_q = qkit.connect(f"t9-calm-{concurrency}", home=embedded_home, database_url=db, backoff_base=0)
    marker = tmp_path / "hung-child"
    RELEASE.clear()
    try:
        hung = hung_q.enqueue("t9_hang", {"child": str(marker)}, max_attempts=1)
        calm = calm_q.enqueue("t9_innocent", {"wait_for": str(marker)})
        results: dict[str, object] = {}

        def burst(name: str, q: qkit.Queue) -> None:
            results[name] = q.work(max_jobs=1, concurrency=concurrency)

        threads = [threading.Thread(target=burst, args=(n, q)) for n, q in (("hung", hung_q), ("calm", calm_q))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results["hung"].failed == 1 and results["calm"].completed == 1, results
        assert hung_q.get(hung).status == "failed"
        # the innocent job's `sleep 4` ran to its end: it was not killed by the other burst's clean-up
        assert calm_q.get(calm).result == {"returncode": 0}
        assert _gone(int(marker.read_text()))  # the timed-out job's own child was killed
    finally:
        RELEASE.set()
        hung_q.close()
        calm_q.close()

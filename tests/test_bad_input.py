"""Every user error is one line and exit 2 (4xx over HTTP), never "internal error" (issue 12 item 11).

The CLI runs as a subprocess (``python -m qkit.cli``) with this checkout on
PYTHONPATH; a job queued before the refusals must be there, unchanged, after.
A failing ledger is one line naming it (password masked), exit 1.
"""
from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import qkit
from qkit.errors import BadInput, NotFound
MAX_ID = 2**63 - 1  # what SQLite INTEGER and PostgreSQL BIGINT hold

ROOT = Path(__file__).resolve().parents[1]
HUGE_INT = "9" * 5000


def cli(env: dict[str, str], *args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkit.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=preexec_fn)


def one_line(out: subprocess.CompletedProcess, code: int) -> str:
    assert out.returncode == code, (out.returncode, out.stdout[-500:], out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-2000:]
    assert "internal error" not in lines[0] and "Traceback" not in out.stderr
    return lines[0]


@pytest.fixture
def env(embedded_home: Path, tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("QKIT_", "UPSTASH_"))}
    e.update(QKIT_HOME=str(embedded_home), QKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return e


@pytest.fixture
def queued(env: dict[str, str]) -> dict:
    """One job queued before the refusals: it must be the queue's only job, unchanged, after them."""
    out = cli(env, "enqueue", "keep", "--payload", '{"n": 1}', "--json")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["id"]
    yield {"id": job_id}
    after = cli(env, "stats", "--json")
    assert json.loads(after.stdout)["total"] == 1
    job = json.loads(cli(env, "job", str(job_id), "--json").stdout)
    assert job["status"] == "pending" and job["payload"] == {"n": 1}


def _files(tmp: Path) -> dict[str, str]:
    (tmp / "huge_int.json").write_text('{"a": ' + HUGE_INT + "}")
    (tmp / "latin1.json").write_bytes(b'{"name": "caf\xe9.txt"}')
    (tmp / "deep.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp / "deep_array.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp / "dup.json").write_text('{"a": 1, "a": 2}')
    (tmp / "nan.json").write_text('{"a": NaN}')
    (tmp / "list.json").write_text("[1, 2]")
    return {name: f"@{tmp / (name + '.json')}" for name in
            ("huge_int", "latin1", "deep", "deep_array", "dup", "nan", "list")}


def test_bad_payloads_on_the_command_line_are_one_line_exit_2(env, queued, tmp_path: Path):
    files = _files(tmp_path)
    cases = {
        "huge integer inline": ('{"a": ' + HUGE_INT + "}", "digits"),
        "huge integer in a file": (files["huge_int"], "digits"),
        "non-UTF-8 file": (files["latin1"], "not UTF-8"),
        "100,000 deep object": (files["deep"], "deeper than"),
        "100,000 deep array": (files["deep_array"], "deeper than"),
        "duplicate key": (files["dup"], "twice"),
        "NaN": (files["nan"], "NaN"),
        "not an object": (files["list"], "object"),
        "/dev/zero": ("@/dev/zero", "larger than"),
        "a directory": (f"@{tmp_path}", "cannot be read"),
        "a missing file": (f"@{tmp_path / 'nope.json'}", "cannot be read"),
        "float out of range": ('{"a": 1e999}', "out of range"),
    }
    for name, (payload, why) in cases.items():
        line = one_line(cli(env, "enqueue", "t", "--payload", payload), 2)
        assert "--payload" in line and why in line, (name, line)
        assert len(line) < 400, (name, line)


def test_dev_zero_is_refused_without_reading_it_whole(env):
    # a 1 GB address-space cap: reading /dev/zero whole would fail with MemoryError, not a refusal
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    out = cli(env, "enqueue", "t", "--payload", "@/dev/zero", preexec_fn=cap)
    assert "larger than" in one_line(out, 2)


@pytest.mark.parametrize("args", [
    ("job", str(2**63)), ("explain", str(2**63)), ("dlq", "replay", str(2**63)), ("job", HUGE_INT),
    ("job", "0"), ("prune", "--completed-older-than", "99999999999d"),
    ("prune", "--completed-older-than", "1e300d"),
])
def test_out_of_range_numbers_are_one_line_exit_2(env, queued, args):
    line = one_line(cli(env, *args), 2)
    assert len(line) < 400 or args[-1] == HUGE_INT


@pytest.mark.parametrize("home", ["/proc/nope", "/etc/hostname", "/dev/null/sub"])
def test_an_unusable_qkit_home_is_named_exit_2(env, home):
    line = one_line(cli({**env, "QKIT_HOME": home, "QKIT_DATABASE_URL": ""}, "stats"), 2)
    assert "QKIT_HOME" in line and home in line


def test_a_ledger_that_is_down_is_one_line_naming_it_without_its_password(env):
    password = "pw-" + secrets.token_hex(6)
    url = f"postgresql://bob:{password}@127.0.0.1:1/nowhere"
    line = one_line(cli({**env, "QKIT_DATABASE_URL": url}, "enqueue", "t"), 1)
    assert "QKIT_DATABASE_URL" in line and password not in line and "127.0.0.1:1" in line


def test_a_full_disk_under_the_ledger_is_one_line_naming_it(env, tmp_path: Path):
    db = tmp_path / "small.sqlite3"
    small = {**env, "QKIT_DATABASE_URL": f"sqlite:///{db}"}
    assert cli(small, "enqueue", "t").returncode == 0  # the schema exists: only the job's write fails
    payload = tmp_path / "p.json"
    payload.write_text(json.dumps({"blob": "x" * 200_000}))

    def full() -> None:  # writes past 64 KiB of a file fail with EFBIG, like a full disk: the job's WAL
        # frames need ~200 KB, whatever the database file's own size (its page size)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    line = one_line(cli(small, "enqueue", "t", "--payload", f"@{payload}", preexec_fn=full), 1)
    assert "ledger" in line and "QKIT_DATABASE_URL" in line


# --------------------------------------------------------------------------- Python API
@pytest.fixture
def q(embedded_home: Path, tmp_path: Path):
    with qkit.connect("bad-input", home=embedded_home, database_url=f"sqlite:///{tmp_path / 'l.sqlite3'}") as q:
        yield q


@pytest.mark.parametrize("payload", [
    {"a": "\ud800"}, {"k": ["ok", {"deep": "x\udfff"}]}, {"\udc80": 1},
    {1: "a", "1": "b"}, {"x": {True: 1, "true": 2}}, {"n": {None: 1, "null": 2}},
    {"a": 10 ** 5000},
])
def test_python_payloads_the_ledger_cannot_keep_faithfully_are_bad_input(q, payload):
    kept = q.enqueue("keep", {"n": 1})
    with pytest.raises(BadInput):
        q.enqueue("t", payload)
    with pytest.raises(BadInput):
        q.enqueue_many([{"type": "t", "payload": {"fine": 1}}, {"type": "t", "payload": payload}])
    assert [j.id for j in q.jobs()] == [kept]  # nothing else was written


def test_an_idempotency_key_with_a_lone_surrogate_is_bad_input(q):
    with pytest.raises(BadInput):
        q.enqueue("t", {}, key="k-\ud800")
    assert q.jobs() == []


def test_distinct_non_text_keys_are_still_accepted(q):
    job_id = q.enqueue("t", {1: "a", "2": "b"})
    assert q.get(job_id).payload == {"1": "a", "2": "b"}


@pytest.mark.parametrize("bad", [2**63, 10**30, 0, -1])
def test_python_ids_out_of_range_are_bad_input(q, bad):
    from qkit.ops.explain import explain

    for call in (q.get, q.replay, lambda i: explain(q, i)):
        with pytest.raises(BadInput):
            call(bad)
    with pytest.raises(NotFound):  # the largest id is a valid id: no job has it, no overflow
        q.get(MAX_ID)


# --------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from qkit.backends.embedded import EmbeddedServer
    from services import start_api_server

    home = tmp_path_factory.mktemp("bad-input-api")
    token = "api-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QKIT_", "UPSTASH_"))}
    env.update(QKIT_HOME=str(home), QKIT_API_TOKEN=token,
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    server = start_api_server(env, home / "server.log")
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            yield c
    finally:
        server.stop()
        EmbeddedServer(home).stop()


@pytest.mark.parametrize("body", [
    b'{"type": "t", "payload": {"a": "\\ud800"}}',
    b'{"type": "t", "payload": {"a": ' + HUGE_INT.encode() + b"}}",
    b'{"type": "t", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"type": "t", "payload": {"a": "caf\xe9"}}',
    b'{"type": "t", "payload": {"a": 1, "a": 2}}',
])
def test_http_refuses_the_same_payloads_with_4xx(api, body):
    r = api.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


@pytest.mark.parametrize("path", [f"/api/jobs/{2**63}", f"/api/jobs/{HUGE_INT[:100]}"])
def test_http_ids_out_of_range_are_4xx(api, path):
    r = api.get(path)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])

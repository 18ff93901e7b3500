"""Security checklist S1-S8 (docs/reliability.md, "S1–S8"), with real servers.

Each requirement has its own group of tests, named ``test_s<N>_...``.  Tests that
already exist elsewhere are referenced, not copied.

S1  JSON only; code is chosen only by the handler allow-list.
    test_s1_raw_redis_entries_never_run_code      pickle bytes, ``os.system(...)`` text, JSON, signs, exponents,
                                                  huge numbers written straight into ready / delayed / leased
                                                  (every backend): removed with a warning, nothing runs, good
                                                  jobs still complete
    test_s1_type_names_never_select_code          types ``os.system`` / dotted paths (enqueued, or written into
                                                  a ledger row): failed as UnknownJobType, no import, no call
    test_s1_no_pickle_eval_or_import_on_data      static: no pickle/marshal/yaml/eval/exec in qkit; the only
                                                  import_module takes QKIT_HANDLERS
S2  Fail closed.  Auth matrix, 503 when unset/empty: tests/test_api.py
    (test_jobs_routes_refuse_bad_credentials, test_unset_or_empty_tokens_close_their_routes,
    test_scheme_is_case_insensitive..., test_blank_secrets_count_as_unset).  Here:
    test_s2_health_and_errors_reveal_no_configuration   /api/health, 404, 405, 401 bodies and headers
    test_s2_serve_binds_loopback_by_default             the listening socket is 127.0.0.1
S3  Constant-time comparison.  Non-ASCII tokens on a live server: tests/test_api.py (BAD_AUTH).  Here:
    test_s3_auth_compares_bytes_with_compare_digest     static: every secret comparison in qkit/api/ and
                                                        dev/upstash.py is hmac.compare_digest on bytes
    test_s3_non_ascii_credentials_are_401_not_500       every credential path, raw bytes on the socket
S4  No secret in logs, errors, notebooks, ledger.
    test_s4_notebook_parameters_refuse_secrets          check_params and run_worker refuse before papermill
    test_s4_scheduled_runs_are_git_ignored
    test_s4_no_secret_is_ever_written                   sentinel values for every secret; bad/unreachable
                                                        Redis, wrong Redis password, unreachable PostgreSQL,
                                                        Upstash 401, API 401s, a handler raising every secret,
                                                        CLI work/stats/enqueue/job/dlq, scheduled runs (ok and
                                                        failing), Redis down under ``qkit serve``; then grep
                                                        every output, log, notebook, ledger text column, Redis
S5  Names cannot inject.
    test_s5_fuzzed_names_are_refused_or_isolated        hypothesis: queue/type/key through qkit.connect/enqueue
    test_s5_fuzzed_cli_names_are_one_line_exit_2        hypothesis: the CLI entry point; plus real processes
    test_s5_no_key_outside_the_prefix                   SCAN of a dedicated redis-server after the fuzzing
    test_s5_scripts_get_user_text_only_as_keys_and_argv static
    test_s5_sql_is_never_built_from_values              static
    test_s5_a_foreign_id_in_a_queue_is_not_run          another queue's job id written into this queue's keys
S6  Size caps.  262,144 vs 262,145 bytes: tests/test_queue.py::test_payload_size_boundary and
    tests/test_api.py::test_payload_limit_is_exact; Content-Length 413: test_api.  Here:
    test_s6_batch_key_and_depth_caps                   enqueue_many count, key length, payload depth
    test_s6_stored_error_text_is_truncated              a 1 MB exception message -> <= 64 KiB + marker
    test_s6_50mb_chunked_post_is_413_without_buffering  server peak RSS stays low
S7  Locked-down Redis.  Unauthenticated refusal, dir 0700, password 0600:
    tests/test_embedded.py::test_locked_down.  Here:
    test_s7_embedded_server_listens_nowhere_else        socket 0600, no TCP port, requirepass = password file
    test_s7_rediss_verifies_certificates                real TLS redis-server with a self-signed certificate
S8  Forged or replayed triggers.  Forged signatures: tests/test_api.py::test_qstash_signed_requests.  Here:
    test_s8_replayed_signed_request_runs_no_job_twice   same signed request twice, and twice at once
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import jwt
import pytest
import redis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import text

import qkit
from qkit.dev.servers import free_port, stop_process, wait_until
from qkit.model import MAX_JSON_DEPTH, MAX_KEY_LENGTH, NAME_RE

from conftest import run_burst, wait_for
from job_handlers import read_log
from redis_servers import start_plain_redis
from services import ApiServer, start_api_server

ROOT = Path(__file__).resolve().parent.parent
QKIT = ROOT / "qkit"
SCRUBBED = ("QKIT_", "UPSTASH_", "QSTASH_", "WORKER_SECRET")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkit.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def one_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


# =========================================================================== S1
class _Boom:
    """Unpickling this runs ``touch <path>``: the sentinel side effect of S1."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _raw_redis(setup, request) -> redis.Redis:
    """A plain client on the Redis behind the setup (bytes, no decoding)."""
    if setup.name == "embedded-sqlite":
        from qkit.backends.embedded import EmbeddedServer

        server = EmbeddedServer(setup.home)
        info = json.loads(server.info_file.read_text())
        return redis.Redis(unix_socket_path=info["socket"], password=server.password_file.read_text().strip()) \
            if info.get("socket") else redis.Redis(port=info["port"], password=server.password_file.read_text())
    return redis.Redis.from_url(request.getfixturevalue("redis_server").url)


def test_s1_raw_redis_entries_never_run_code(setup, request, tmp_path):
    q = setup.connect(backoff_base=0)
    good = [q.enqueue("web_scraping", {"i": i}) for i in range(3)]
    sentinel = tmp_path / "PWNED"
    junk: list[bytes | str] = [
        pickle.dumps(_Boom(sentinel)),                          # pickle bytes that would run a command
        f"os.system('touch {sentinel}')",                      # code as text
        json.dumps({"type": "os.system", "payload": {"cmd": f"touch {sentinel}"}, "id": good[0]}),
        "abc", "-5", "+7", "1e3", "0", "007", " 12", "12 ", "99999999999999999999",  # not canonical ids
        "9223372036854775808",                                 # 2^63: no BIGINT holds it
        "\u00e9\u00e9", b"\xff\xfe\x00",                        # non-ASCII and non-UTF-8
    ]
    raw = _raw_redis(setup, request)
    prefix = f"qkit:{{{q.name}}}:"
    try:
        raw.zadd(prefix + "ready", {m: i for i, m in enumerate(junk)})
        raw.zadd(prefix + "delayed", {m: 0 for m in junk[:4]})  # due long ago
        raw.zadd(prefix + "leased", {m: 0 for m in junk[:4]})   # expired leases ...
        raw.hset(prefix + "owners", mapping={m: b"\x80\x04owner" for m in junk[:4]})  # ... with junk owners
        raw.hset(prefix + "prio", mapping={m: "1e308" for m in junk[:4]})

        out = run_burst(setup, env={"QKIT_BACKOFF_BASE": "0"})
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["completed"] == 3 and summary["failed"] == 0, summary
        assert [q.get(i).status for i in good] == ["completed"] * 3
        assert not sentinel.exists()
        warnings = [line for line in out.stderr.splitlines() if "malformed Redis entr" in line]
        assert warnings and all("nothing ran" in w for w in warnings), out.stderr
        assert "Traceback" not in out.stderr
        # every junk member is gone from the places a claim looks at; nothing is left leased
        for place in ("ready", "delayed", "leased"):
            assert raw.zcard(prefix + place) == 0, (place, raw.zrange(prefix + place, 0, -1))
        # the ledger is untouched by the junk: only the three good jobs exist in this queue
        assert sorted(j.id for j in q.jobs()) == sorted(good)
        # audit's snapshot lists job ids only, even with junk still present
        raw.zadd(prefix + "dead", {junk[0]: 1, "xyz": 2})
        assert q.dispatch.snapshot().dead == set()
    finally:
        raw.close()


HANDLER_MODULE = '''
from pathlib import Path
Path({imported!r}).write_text("imported")  # importing this module at all is the breach


def run(*args, **kwargs):
    Path({called!r}).write_text("called")
'''


def test_s1_type_names_never_select_code(setup, tmp_path):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    imported, called = tmp_path / "IMPORTED", tmp_path / "CALLED"
    (mod_dir / "s1_sentinel_mod.py").write_text(HANDLER_MODULE.format(imported=str(imported), called=str(called)))
    q = setup.connect(backoff_base=0)
    hostile = {"pickle": base64.b64encode(pickle.dumps(_Boom(called))).decode(), "py/object": "os.system",
               "__reduce__": ["os.system", f"touch {called}"], "handler": "s1_sentinel_mod.run"}
    bad = [q.enqueue(t, hostile, max_attempts=1) for t in
           ("os.system", "s1_sentinel_mod.run", "s1_sentinel_mod", "builtins.eval", "subprocess.call")]
    good = q.enqueue("web_scraping", hostile)  # payload fields select nothing
    # a ledger row rewritten behind qkit's back: its type is a dotted path
    rewritten = q.enqueue("web_scraping", {})
    with q.ledger.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET type = :t WHERE id = :i"), {"t": "s1_sentinel_mod.run", "i": rewritten})

    # a payload rewritten behind qkit's back: pickle (protocol 0 is text) on SQLite, a JSON array on PostgreSQL
    garbled = q.enqueue("web_scraping", {})
    with q.ledger.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("UPDATE jobs SET payload = CAST('[1, 2]' AS jsonb) WHERE id = :i"), {"i": garbled})
        else:
            conn.execute(text("UPDATE jobs SET payload = :p WHERE id = :i"),
                         {"p": f"cos\nsystem\n(S'touch {called}'\ntR.", "i": garbled})

    pythonpath = os.pathsep.join([str(mod_dir), setup.env()["PYTHONPATH"]])
    out = run_burst(setup, env={"PYTHONPATH": pythonpath})
    assert out.returncode == 0, out.stderr
    assert not imported.exists() and not called.exists()
    for job_id in [*bad, rewritten]:
        job = q.get(job_id)
        assert job.status == "failed" and job.attempts == 1, job
        assert job.error.startswith("UnknownJobType: no handler is registered for job type"), job.error
    assert q.get(good).status == "completed" and q.get(good).payload == hostile
    with q.ledger.read_engine.connect() as conn:  # read raw: the row's payload is not JSON on SQLite
        status, attempts, error = conn.execute(text("SELECT status, attempts, error FROM jobs WHERE id = :i"),
                                               {"i": garbled}).one()
    assert (status, attempts) == ("failed", 1) and error.startswith("InvalidPayload:"), error


BANNED_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle", "yaml", "joblib"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def _qkit_sources() -> list[Path]:
    return sorted(p for p in QKIT.rglob("*.py") if "__pycache__" not in p.parts)


def test_s1_no_pickle_eval_or_import_on_data():
    import_module_calls = []
    for path in _qkit_sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & BANNED_MODULES, (path, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in BANNED_MODULES, (path, node.lineno)
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name):
                    assert func.id not in BANNED_CALLS, (path, node.lineno, func.id)
                if isinstance(func, ast.Attribute) and func.attr in ("import_module", "import_string",
                                                                     "import_attribute", "locate"):
                    import_module_calls.append((path.relative_to(ROOT).as_posix(), node))
    # the one dynamic import: handler modules named by the operator in QKIT_HANDLERS
    assert [p for p, _ in import_module_calls] == ["qkit/engine/handlers.py"]
    handlers_tree = ast.parse((QKIT / "engine" / "handlers.py").read_text())
    (fn,) = [n for n in ast.walk(handlers_tree) if isinstance(n, ast.FunctionDef)
             and any(getattr(c, "attr", "") == "import_module" for c in ast.walk(n))]
    assert fn.name == "import_handler_modules"
    callers = []
    for path in _qkit_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) \
                    == "import_handler_modules":
                callers.append(ast.unparse(node.args[0]))
    assert callers and all(c.endswith("settings.handler_modules") for c in callers), callers
    from qkit.config import settings

    assert "QKIT_HANDLERS" in (QKIT / "config.py").read_text() and settings.__name__ == "settings"
    # payloads and results are JSON columns, read with json only
    ledger_src = "".join(p.read_text() for p in (QKIT / "ledger").glob("*.py"))
    assert "json.loads" in ledger_src and "JSON" in ledger_src


# =========================================================================== shared world (S2-S4, S6, S8)
API_TOKEN = "s4api-" + secrets.token_hex(12)
WORKER_SECRET = "s4wrk-" + secrets.token_hex(12)
QSTASH_CURRENT = "s4qcur-" + secrets.token_hex(16)
QSTASH_NEXT = "s4qnext-" + secrets.token_hex(16)
UPSTASH_TOKEN = "s4ups-" + secrets.token_hex(12)
REDIS_PW = "s4rpw-" + secrets.token_hex(12)
WRONG_REDIS_PW = "s4rbad-" + secrets.token_hex(12)
DB_PW = "s4dbpw-" + secrets.token_hex(12)
SENTINELS = (API_TOKEN, WORKER_SECRET, QSTASH_CURRENT, QSTASH_NEXT, UPSTASH_TOKEN, REDIS_PW, WRONG_REDIS_PW, DB_PW)
WORLD_QUEUE = "s4world"

LEAKY_HANDLERS = '''
import os
from urllib.parse import urlsplit

import qkit

VARIABLES = ("QKIT_REDIS_URL", "QKIT_DATABASE_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_API_TOKEN", "WORKER_SECRET",
             "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY")


@qkit.handler("s4_leak", timeout=30)
def leak(payload):
    """Fails quoting every secret it can see: whole URLs, bare passwords, tokens."""
    values = {name: os.environ.get(name, "") for name in VARIABLES}
    passwords = [urlsplit(values[n]).password or "" for n in ("QKIT_REDIS_URL", "QKIT_DATABASE_URL")]
    raise ConnectionError(f"cannot reach {values} (passwords {passwords})")
'''


@dataclass
class World:
    """A Redis with a password, PostgreSQL with a password in its URL, every secret set."""

    redis: Any
    redis_url: str
    database_url: str
    home: Path
    env: dict[str, str]
    folder: Path

    def connect(self, queue: str = WORLD_QUEUE) -> qkit.Queue:
        return qkit.connect(queue, redis_url=self.redis_url, database_url=self.database_url, home=self.home,
                            backoff_base=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory, postgres_server) -> Iterator[World]:
    from sqlalchemy.engine import make_url

    folder = tmp_path_factory.mktemp("s4world")
    server = start_plain_redis(folder / "redis")
    server.client().config_set("requirepass", REDIS_PW)
    redis_url = f"redis://:{REDIS_PW}@127.0.0.1:{server.port}/0"
    database_url = make_url(postgres_server.url).set(password=DB_PW).render_as_string(hide_password=False)
    assert DB_PW in database_url
    mods = folder / "mods"
    mods.mkdir()
    (mods / "s4_handlers.py").write_text(LEAKY_HANDLERS)
    home = folder / "home"
    env = clean_env(
        QKIT_HOME=str(home), QKIT_REDIS_URL=redis_url, QKIT_DATABASE_URL=database_url,
        UPSTASH_REDIS_REST_TOKEN=UPSTASH_TOKEN, QKIT_API_TOKEN=API_TOKEN, WORKER_SECRET=WORKER_SECRET,
        QSTASH_CURRENT_SIGNING_KEY=QSTASH_CURRENT, QSTASH_NEXT_SIGNING_KEY=QSTASH_NEXT,
        QKIT_HANDLERS="job_handlers,s4_handlers", QKIT_BACKOFF_BASE="0", QKIT_API_MAX_SECONDS="5",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(mods)]))
    yield World(server, redis_url, database_url, home, env, folder)
    server.stop()


@pytest.fixture(scope="module")
def server(world) -> Iterator[ApiServer]:
    served = start_api_server(world.env, world.folder / "serve.log", "--queue", WORLD_QUEUE)
    yield served
    served.stop()


# =========================================================================== S2
def test_s2_health_and_errors_reveal_no_configuration(server, world):
    health = httpx.get(f"{server.url}/api/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "checks": {"redis": "ok", "ledger": "ok"}}
    answers = [health,
               httpx.get(f"{server.url}/api/nothing"),                         # 404
               httpx.delete(f"{server.url}/api/jobs"),                         # 405
               httpx.get(f"{server.url}/api/jobs"),                            # 401
               httpx.get(f"{server.url}/api/jobs/1", headers={"Authorization": "Bearer x"}),
               httpx.post(f"{server.url}/api/workers", content=b"{not json",
                          headers={"Authorization": f"Bearer {WORKER_SECRET}"})]  # 400
    assert [a.status_code for a in answers] == [200, 404, 405, 401, 401, 400]
    forbidden = [*SENTINELS, "redis://", "postgresql", "sqlite", str(world.home), "127.0.0.1:", "QKIT_",
                 qkit.__version__, "uvicorn", "starlette", "python", "Traceback"]
    for answer in answers:
        shown = (answer.text + " " + " ".join(f"{k}: {v}" for k, v in answer.headers.items())).lower()
        assert "server" not in answer.headers
        assert not [f for f in forbidden if f.lower() in shown], (answer.request.url, shown)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_s2_serve_binds_loopback_by_default(server):
    # 0100007F is 127.0.0.1 as the kernel prints it; 0.0.0.0 or :: would be reachable from other hosts
    assert _listening_addresses(server.port) == {"0100007F"}
    help_text = cli(clean_env(), "serve", "--help").stdout
    assert re.search(r"--host TEXT.*\[default: 127\.0\.0\.1\]", " ".join(help_text.split()))


# =========================================================================== S3
def test_s3_auth_compares_bytes_with_compare_digest():
    suspicious = re.compile(r"token|secret|signature|digest|expected|presented|password|claimed|key", re.I)
    dev_files = ("dev/upstash.py", "dev/upstash_wire.py")
    for name in (*sorted(str(p.relative_to(QKIT)) for p in (QKIT / "api").glob("*.py")), *dev_files):
        tree = ast.parse((QKIT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                sides = [node.left, *node.comparators]
                names = [ast.unparse(s) for s in sides if not isinstance(s, ast.Constant)]
                # comparing a secret with == leaks its prefix length through timing
                assert not [n for n in names if suspicious.search(n) and "lower()" not in n
                            and not n.startswith(("variable", "name", "len("))], (name, ast.unparse(node))
    api = (QKIT / "api" / "auth.py").read_text()
    body = api[api.index("def token_matches"):api.index("def verify_qstash_signature")]
    assert "hmac.compare_digest(" in body and "hashlib.sha256(" in body and ".digest()" in body
    verify = api[api.index("def verify_qstash_signature"):api.index("def endpoint_url")]
    assert "hmac.compare_digest(" in verify and ".encode(" in verify
    assert 'token_matches(bearer_token(request.scope)' in api  # raw header bytes, never decoded text
    dev = (QKIT / "dev" / "upstash.py").read_text()
    assert "hmac.compare_digest(presented.strip(), expected)" in dev


def _raw_status(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("token", ["t\u00f6ken".encode("utf-8"), b"\xff\xfe\xfd", "\u2603".encode("utf-8") * 40,
                                   API_TOKEN.encode() + "\u00e9".encode("utf-8")])
def test_s3_non_ascii_credentials_are_401_not_500(server, token):
    for method, path, body in (("GET", "/api/jobs", b""), ("POST", "/api/jobs", b"{}"),
                               ("POST", "/api/workers", b"{}")):
        request = (f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
                   ).encode() + b"Authorization: Bearer " + token + b"\r\n\r\n" + body
        assert _raw_status(server.port, request) == 401, (method, path, token)
    sig = {"Upstash-Signature": token}
    assert httpx.post(f"{server.url}/api/workers", headers=sig, content=b"{}").status_code == 401


# =========================================================================== S6 (server part)
def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_s6_50mb_chunked_post_is_413_without_buffering(server):
    total, sent = 50 * 1024 * 1024, [0]
    before = _peak_rss_kib(server.process.pid)

    def body():
        chunk = b"[" * 65536  # also hostile JSON: it must never reach the parser
        while sent[0] < total:
            sent[0] += len(chunk)
            yield chunk

    for path, token in (("/api/jobs", API_TOKEN), ("/api/workers", WORKER_SECRET)):
        sent[0] = 0
        reply = httpx.post(f"{server.url}{path}", content=body(), timeout=60,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert reply.status_code == 413, (path, reply.text)
        assert sent[0] < total  # the server stopped reading; the client stopped sending
    # unauthenticated: refused before a byte of the body matters
    sent[0] = 0
    assert httpx.post(f"{server.url}/api/jobs", content=body(), timeout=60).status_code in (401, 413)
    grown_mib = (_peak_rss_kib(server.process.pid) - before) / 1024
    assert grown_mib < 16, f"the server's peak RSS grew by {grown_mib:.1f} MiB"
    assert httpx.get(f"{server.url}/api/health").status_code == 200


# =========================================================================== S8
def qstash_signature(body: bytes, url: str, key: str) -> str:
    now = int(time.time())
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    return jwt.encode({"iss": "Upstash", "sub": url, "exp": now + 300, "nbf": now, "iat": now,
                       "jti": "jwt_" + uuid.uuid4().hex, "body": digest}, key, algorithm="HS256")


def test_s8_replayed_signed_request_runs_no_job_twice(server, world, tmp_path):
    log = tmp_path / "executions"
    with world.connect() as q:
        first = [q.enqueue("record", {"log": str(log)}) for _ in range(6)]
        url = f"{server.url}/api/workers"
        body = b'{"max_jobs": 50}'
        headers = {"Upstash-Signature": qstash_signature(body, url, QSTASH_CURRENT),
                   "Content-Type": "application/json"}
        replies = [httpx.post(url, content=body, headers=headers, timeout=60) for _ in range(2)]  # replayed
        assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
        assert replies[0].json()["completed"] == 6 and replies[1].json()["processed"] == 0
        # the same captured request replayed concurrently against new work
        second = [q.enqueue("record", {"log": str(log), "sleep": 0.05}) for _ in range(6)]
        concurrent: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: concurrent.append(
            httpx.post(url, content=body, headers=headers, timeout=60))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in concurrent] == [200] * 3
        assert sum(r.json()["completed"] for r in concurrent) == 6
        runs = [row for row in read_log(log) if row[0] == "start"]
        assert sorted(r[1] for r in runs) == sorted(first + second)  # each job ran exactly once
        assert all(q.get(i).status == "completed" and q.get(i).attempts == 1 for i in first + second)
        # a forged replay (same signature, other body) runs nothing
        forged = httpx.post(url, content=b'{"max_jobs": 1000}', headers=headers, timeout=60)
        assert forged.status_code == 401


# =========================================================================== S4
def test_s4_notebook_parameters_refuse_secrets(monkeypatch, tmp_path):
    from qkit.analysis.notebook_helpers import QUEUE, Param, ParameterError, check_params
    from qkit.runs.runner import run_worker

    monkeypatch.setenv("QKIT_REDIS_URL", f"redis://:{REDIS_PW}@127.0.0.1:1/0")
    monkeypatch.setenv("QKIT_DATABASE_URL", f"postgresql+psycopg://u:{DB_PW}@127.0.0.1:1/d")
    monkeypatch.setenv("UPSTASH_REDIS_REST_TOKEN", UPSTASH_TOKEN)
    history = {"In": ["", '# Parameters\nqueue = "x"\nlabel = "y"\n']}
    for value in (REDIS_PW, f"pw is {DB_PW}", UPSTASH_TOKEN, "redis://:anything@host:6379/0"):
        with pytest.raises(ParameterError, match="secret"):
            check_params({**history, "queue": "default", "label": value}, {"queue": QUEUE, "label": Param(str)})
    check_params({**history, "queue": "default", "label": "fine"}, {"queue": QUEUE, "label": Param(str)})
    runs = tmp_path / "runs"
    for params in ({"label": f"redis://:{REDIS_PW}@h:1/0"}, {"api_token": "x"}, {"label": [UPSTASH_TOKEN]}):
        with pytest.raises(qkit.BadInput, match="secret"):
            run_worker(queue="s4nb", parameters=params, runs_dir=runs, home=tmp_path / "home")
    assert not runs.exists()  # refused before papermill wrote anything


def test_s4_scheduled_runs_are_git_ignored():
    for path in ("scheduled/runs/2025/01/02/worker-20250102T030405Z.ipynb",
                 "scheduled/runs/2025/01/02/worker-20250102T030405Z.ipynb.log",
                 "scheduled/runs/2025/01/02/worker-20250102T030405Z.ipynb.json", ".qkit/redis/password"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
    tracked = subprocess.run(["git", "ls-files", "scheduled/runs", ".qkit"], cwd=ROOT, capture_output=True,
                             text=True).stdout
    assert tracked == ""


# =========================================================================== S5
NASTY = st.one_of(
    st.sampled_from(["}", "{", ":", "*", "?", "'", '"', "--", "\x00", "a}b", "x{y}z", "q:1", "q*", "[a]", "a" * 65,
                     "a" * 64, "ok-name", "ok.name_1", "../etc", "DROP TABLE jobs;--", "\u00e9", "\U0001f600", " ",
                     "", "a b", "a\nb", "%s", "{0}", "Robert'); --"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=70),
    st.text(alphabet="abz09_.-{}:*?'\"\\ \x00", max_size=70),
)


@pytest.fixture(scope="module")
def s5(module_redis, tmp_path_factory):
    module_redis.client().flushall()
    folder = tmp_path_factory.mktemp("s5")
    db = f"sqlite:///{folder / 'ledger.sqlite3'}"
    opened: dict[str, qkit.Queue] = {}

    def connect(name: str) -> qkit.Queue:
        if name not in opened:
            opened[name] = qkit.connect(name, redis_url=module_redis.url, database_url=db, home=folder)
        return opened[name]

    yield connect, module_redis, db, folder
    for q in opened.values():
        q.close()


VALID_NAME = st.from_regex(NAME_RE, fullmatch=True)


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(queue=st.one_of(NASTY, VALID_NAME), type_=st.one_of(NASTY, VALID_NAME), key=st.one_of(st.none(), NASTY))
def test_s5_fuzzed_names_are_refused_or_isolated(s5, queue, type_, key):
    connect, *_ = s5
    try:
        q = connect(queue)
    except qkit.BadInput as exc:
        assert not NAME_RE.fullmatch(queue)
        assert "\n" not in str(exc).replace("\\n", "")
        return
    assert NAME_RE.fullmatch(queue)
    other = connect("s5-other" if queue != "s5-other" else "s5-other2")
    try:
        job_id = q.enqueue(type_, {"probe": True}, key=key, delay=3600)
    except qkit.BadInput:
        assert not NAME_RE.fullmatch(type_) or (key is not None and (
            not key or len(key) > MAX_KEY_LENGTH or "\x00" in key
            or any(0xD800 <= ord(ch) <= 0xDFFF for ch in key)))  # NUL and lone surrogates: not storable text
        return
    assert NAME_RE.fullmatch(type_)
    job = q.get(job_id)
    assert (job.queue, job.idempotency_key) == (queue, key)
    assert job.type == type_ or key is not None  # a key held since an earlier example returns that job
    with pytest.raises(qkit.NotFound):
        other.get(job_id)
    assert job_id not in {j.id for j in other.jobs(limit=1000)}
    assert job_id not in other.dispatch.snapshot().delayed
    if key is not None:  # the same key in another queue is another job
        assert other.enqueue(type_, {}, key=key, delay=3600) != job_id


@hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(queue=NASTY, type_=NASTY)
def test_s5_fuzzed_cli_names_are_one_line_exit_2(s5, queue, type_, capsys):
    from qkit import cli as qcli

    if NAME_RE.fullmatch(queue) and NAME_RE.fullmatch(type_):
        return  # accepted names are covered above
    _, server, db, folder = s5
    env = {"QKIT_REDIS_URL": server.url, "QKIT_DATABASE_URL": db, "QKIT_HOME": str(folder)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        capsys.readouterr()
        code = qcli.main(["enqueue", type_, "--queue", queue, "--payload", "{}"])
        out = capsys.readouterr()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert code == 2 and out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err and lines[0].startswith("qkit: "), out.err


def test_s5_cli_refuses_hostile_names_in_a_real_process(s5):
    _, server, db, folder = s5
    env = clean_env(QKIT_REDIS_URL=server.url, QKIT_DATABASE_URL=db, QKIT_HOME=str(folder))
    before = {k for k in server.client().scan_iter(match="*")}
    for args, needle in ((["enqueue", "web_scraping", "--queue", "a}{b:*"], "queue name"),
                         (["enqueue", "os.system('id')", "--queue", "s5cli"], "job type"),
                         (["enqueue", "web_scraping", "--queue", "s5cli", "--key", "k" * 257], "key")):
        out = cli(env, *args)
        assert out.returncode == 2 and out.stdout == "" and needle in one_line(out), out.stderr
    assert {k for k in server.client().scan_iter(match="*")} == before  # nothing written


KEY_PARTS = {"ready", "delayed", "leased", "owners", "dead", "prio", "clock"}


def test_s5_no_key_outside_the_prefix(s5):
    connect, server, *_ = s5
    q = connect("s5-keys")
    q.enqueue("web_scraping", {"x": "}{:*?"}, key="}{:*?--\u00e9", delay=3600)
    q.enqueue("web_scraping", {})
    q.work(max_jobs=5)
    keys = list(server.client().scan_iter(match="*", count=1000))
    assert keys, "the fuzzing wrote nothing at all?"
    for key in keys:
        m = re.fullmatch(r"qkit:\{(?P<queue>[^{}]*)\}:(?P<part>[a-z]+)", key)
        assert m and NAME_RE.fullmatch(m["queue"]) and m["part"] in KEY_PARTS, key


def test_s5_scripts_get_user_text_only_as_keys_and_argv():
    scripts = sorted((QKIT / "lua").glob("*.lua"))
    assert {p.stem for p in scripts} >= {"claim", "push", "renew", "remove", "inventory", "locate"}
    loader = (QKIT / "lua" / "__init__.py").read_text()
    assert 'joinpath(f"{name}.lua").read_text' in loader  # script text comes from the package's files only
    for path in _qkit_sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            call = ast.unparse(node.func)
            if node.func.attr == "run" and call.endswith("backend.run"):
                name = node.args[0]  # a script name: a literal naming a shipped file
                assert isinstance(name, ast.Constant) and (QKIT / "lua" / f"{name.value}.lua").is_file(), \
                    (path, ast.unparse(node))
            if node.func.attr in ("eval", "evalsha", "script_load", "register_script"):
                first = ast.unparse(node.args[0]) if node.args else ""
                assert first in ("script.source", "script.sha"), (path, ast.unparse(node))
            if node.func.attr in ("scan_iter", "scan", "keys"):
                for kw in node.keywords:  # no user text in a MATCH glob
                    assert kw.arg != "match" or isinstance(kw.value, ast.Constant), (path, ast.unparse(node))
    for path in scripts:  # the scripts read names from KEYS/ARGV and never build code
        source = path.read_text()
        assert not re.search(r"\b(loadstring|load|dofile|setfenv)\s*\(", source), path


def test_s5_sql_is_never_built_from_values():
    for path in _qkit_sources():
        if path.as_posix().endswith("dev/servers.py"):  # test/bench servers: CREATE DATABASE of a fixed name
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name not in ("exec_driver_sql", "text", "execute") or not node.args:
                continue
            # execute(text/statement objects) is fine; execute of a string built from values is not
            if name == "execute" and not isinstance(node.args[0], (ast.JoinedStr, ast.BinOp)) and not (
                    isinstance(node.args[0], ast.Call) and getattr(node.args[0].func, "attr", "") == "format"):
                continue
            for sub in ast.walk(node.args[0]):
                assert not isinstance(sub, ast.JoinedStr), (path, node.lineno, "f-string SQL")
                assert not (isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Mod)), (path, node.lineno)
                assert not (isinstance(sub, ast.Call) and getattr(sub.func, "attr", "") == "format"), \
                    (path, node.lineno)
    # the hot-path statements are constants with placeholders; values travel as parameters
    from qkit import ledger

    for name in ("SELECT_CLAIM", "SELECT_OPEN", "SELECT_FENCE", "INSERT_JOB", "INSERT_EVENT", "INSERT_ATTEMPT",
                 "CLAIM_JOBS", "SETTLE_JOB", "SETTLE_ATTEMPT"):
        statement = getattr(ledger, name)
        assert "'" not in statement.replace("'pending'", "").replace("'processing'", ""), name


def test_s5_a_foreign_id_in_a_queue_is_not_run(s5, tmp_path):
    connect, server, *_ = s5
    mine, other = connect("s5-mine"), connect("s5-theirs")
    log = tmp_path / "log"
    import job_handlers  # noqa: F401  (registers "record" in this process)

    theirs = other.enqueue("record", {"log": str(log)})  # due now, in its own queue's ready set
    server.client().zadd("qkit:{s5-mine}:ready", {str(theirs): 0})  # written behind qkit's back
    mine.work(max_jobs=10)
    assert read_log(log) == []  # another queue's job does not run in this queue's burst
    assert other.get(theirs).status == "pending" and other.get(theirs).attempts == 0
    assert theirs in other.dispatch.snapshot().ready and mine.dispatch.snapshot().place_of(theirs) is None
    other.work(max_jobs=10)  # its own queue runs it, once
    assert [r[1] for r in read_log(log) if r[0] == "start"] == [theirs]


# =========================================================================== S6
def test_s6_batch_key_and_depth_caps(s5):
    from qkit.model import MAX_PAYLOAD_BYTES
    from qkit.engine.queue import MAX_BATCH_BYTES, MAX_BATCH_ITEMS

    connect, *_ = s5
    q = connect("s6-caps")
    q.enqueue("web_scraping", {"already": "queued"}, delay=3600)
    before = (len(q.jobs(limit=1000)), q.dispatch.inventory().delayed)
    with pytest.raises(qkit.BadInput, match=f"at most {MAX_BATCH_ITEMS}"):
        q.enqueue_many([{"type": "web_scraping", "payload": {}}] * (MAX_BATCH_ITEMS + 1))
    with pytest.raises(qkit.BadInput, match="key"):
        q.enqueue("web_scraping", {}, key="k" * (MAX_KEY_LENGTH + 1))
    deep: dict = {}
    inner = deep
    for _ in range(MAX_JSON_DEPTH):  # one level more than allowed (the payload object is level 1)
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(qkit.BadInput, match="nests deeper"):
        q.enqueue("web_scraping", deep)
    very_deep: list = []
    for _ in range(100_000):  # deeper than Python's recursion limit: still one clear refusal
        very_deep = [very_deep]
    with pytest.raises(qkit.BadInput, match="nests deeper"):
        q.enqueue("web_scraping", {"x": very_deep})
    big = {"x": "b" * (MAX_PAYLOAD_BYTES - 8)}  # 256 KiB each: the byte cap is reached long before the count cap
    with pytest.raises(qkit.BadInput, match=f"at most {MAX_BATCH_BYTES} bytes"):
        q.enqueue_many({"type": "web_scraping", "payload": big} for _ in range(MAX_BATCH_BYTES // MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(qkit.BadInput, match="item 1: payload nests deeper"):
        q.enqueue_many([{"type": "web_scraping", "payload": {}}, {"type": "web_scraping", "payload": deep}])
    assert (len(q.jobs(limit=1000)), q.dispatch.inventory().delayed) == before  # nothing written
    # the boundaries themselves are accepted
    q.enqueue("web_scraping", deep["a"], key="k" * MAX_KEY_LENGTH, delay=3600)


@qkit.handler("s6_shout", timeout=30)
def _s6_shout(payload: dict) -> None:
    raise RuntimeError("x" * (1024 * 1024))


@qkit.handler("s6_big_result", timeout=30)
def _s6_big_result(payload: dict) -> dict:
    return {"x": "r" * (payload["n"] - 8)}


def test_s6_results_are_capped_like_payloads(s5):
    from qkit.model import MAX_PAYLOAD_BYTES

    connect, *_ = s5
    q = connect("s6-result")
    fits = q.enqueue("s6_big_result", {"n": MAX_PAYLOAD_BYTES}, max_attempts=1)
    over = q.enqueue("s6_big_result", {"n": MAX_PAYLOAD_BYTES + 1}, max_attempts=1)
    q.work(max_jobs=2)
    assert q.get(fits).status == "completed" and len(q.get(fits).result["x"]) == MAX_PAYLOAD_BYTES - 8
    refused = q.get(over)
    assert refused.status == "failed" and refused.result is None
    assert f"result is {MAX_PAYLOAD_BYTES + 1} bytes" in refused.error


def test_s6_stored_error_text_is_truncated(s5):
    from qkit.ledger import MAX_TEXT

    connect, *_ = s5
    q = connect("s6-trunc")
    job_id = q.enqueue("s6_shout", {}, max_attempts=1)
    q.work(max_jobs=1)
    job = q.get(job_id)
    assert job.status == "failed"
    assert len(job.error) <= MAX_TEXT + len("…[truncated]") and job.error.endswith("…[truncated]")
    (attempt,) = q.ledger.attempts(job_id)
    for field in ("error", "traceback"):
        assert len(attempt[field]) <= MAX_TEXT + len("…[truncated]"), field
    assert len(attempt["fingerprint"] or "") <= 200


# =========================================================================== S7
def test_s7_embedded_server_listens_nowhere_else(embedded_home):
    from qkit.backends.embedded import EmbeddedServer

    with qkit.connect("s7", home=embedded_home, database_url=f"sqlite:///{embedded_home / 's7.sqlite3'}") as q:
        q.backend.ping()
        client = q.backend.client
        assert client.config_get("port")["port"] == "0"  # no TCP listener at all
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        password = EmbeddedServer(embedded_home).password_file.read_text().strip()
        assert client.config_get("requirepass")["requirepass"] == password and len(password) >= 24
    sock = embedded_home / "redis" / "redis.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    info = embedded_home / "redis" / "server.json"
    assert "password" not in info.read_text()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(sock)).set("qkit:{s7}:ready", "1")


def _tls_files(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a certificate")
def test_s7_rediss_verifies_certificates(tmp_path):
    from qkit.dev.servers import redis_server_binary

    cert, key = _tls_files(tmp_path)
    port = free_port()
    process = subprocess.Popen([redis_server_binary(), "--port", "0", "--tls-port", str(port), "--tls-cert-file",
                                str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no", "--bind",
                                "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        trusted = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert))
        wait_until(trusted.ping, 30, "TLS redis-server", process=process)  # the server works with its CA
        with pytest.raises(qkit.BackendUnavailable, match="(?i)certificate verify failed"):
            with qkit.connect("s7tls", redis_url=f"rediss://127.0.0.1:{port}/0", home=tmp_path,
                              database_url=f"sqlite:///{tmp_path / 'l.sqlite3'}") as q:
                q.backend.ping()
        assert trusted.keys("*") == []  # nothing was written over the unverified connection
    finally:
        stop_process(process)
    source = (QKIT / "backends" / "redis.py").read_text() + (QKIT / "config.py").read_text()
    assert not re.search(r"ssl_cert_reqs|CERT_NONE|check_hostname\s*=\s*False|verify\s*=\s*False", source)


# =========================================================================== S4 (keep last: it scans the server's
# whole log and finally stops the module's Redis)
LEDGER_TEXT = {"jobs": ("error", "result", "payload", "idempotency_key"),
               "job_attempts": ("error", "traceback", "fingerprint", "worker"),
               "worker_runs": ("error", "params", "worker"),
               "job_events": ("detail", "worker")}


def _ledger_text(database_url: str) -> str:
    """Every text column of the ledger that can hold a message, as one string."""
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return "\n".join(str(value) for table, columns in LEDGER_TEXT.items()
                             for row in conn.execute(text(f"SELECT {', '.join(columns)} FROM {table}"))
                             for value in row if value is not None)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_s4_no_secret_is_ever_written(world, server, endpoint_on, tmp_path):
    outputs: list[str] = []

    def run(env: dict[str, str], *args: str, code: int | None = 0) -> subprocess.CompletedProcess:
        out = cli(env, *args)
        outputs.extend([out.stdout, out.stderr])
        if code is not None:
            assert out.returncode == code, (args, out.returncode, out.stdout, out.stderr)
        return out

    env = world.env
    # ---- a burst whose handler raises every secret (CLI, then every way of reading it back)
    leak_id = run(env, "enqueue", "s4_leak", "--queue", WORLD_QUEUE, "--max-attempts", "1").stdout.strip()
    burst = json.loads(run(env, "work", "--queue", WORLD_QUEUE, "--json").stdout)
    assert burst["failed"] >= 1
    shown = run(env, "job", leak_id, "--queue", WORLD_QUEUE).stdout
    assert "ConnectionError: cannot reach" in shown and "redis://:***@" in shown  # the real message, masked
    for args in (["job", leak_id, "--queue", WORLD_QUEUE, "--json"], ["dlq", "list", "--queue", WORLD_QUEUE],
                 ["dlq", "list", "--group", "--queue", WORLD_QUEUE], ["stats", "--queue", WORLD_QUEUE, "--json"],
                 ["runs", "--queue", WORLD_QUEUE, "--json"], ["explain", leak_id, "--queue", WORLD_QUEUE],
                 ["init", "--queue", WORLD_QUEUE]):
        run(env, *args)
    # ---- backends that cannot be reached or refuse us: one line, exit 1, nothing secret
    dead_port = free_port()
    broken = {
        "unreachable redis": {"QKIT_REDIS_URL": f"redis://:{REDIS_PW}@127.0.0.1:{dead_port}/0"},
        "wrong redis password": {"QKIT_REDIS_URL": f"redis://:{WRONG_REDIS_PW}@127.0.0.1:{world.redis.port}/0"},
        "unreachable database": {"QKIT_DATABASE_URL": f"postgresql+psycopg://postgres:{DB_PW}@127.0.0.1:{dead_port}/x"},
    }
    for what, override in broken.items():
        for args in (["stats", "--queue", WORLD_QUEUE], ["enqueue", "web_scraping", "--queue", WORLD_QUEUE],
                     ["work", "--queue", WORLD_QUEUE]):
            out = run({**env, **override}, *args, code=None)
            if args[0] == "stats" and out.returncode == 0:
                continue  # stats reads the ledger only: a dead Redis does not stop it
            line = one_line(out)
            assert out.returncode == 1 and ("QKIT_REDIS_URL" in line or "QKIT_DATABASE_URL" in line), (what, line)
    malformed = run({**env, "QKIT_REDIS_URL": f"redis://:{REDIS_PW}@127.0.0.1:notaport/0"}, "stats", code=2)
    assert "QKIT_REDIS_URL" in one_line(malformed)
    # ---- Upstash: a wrong token (401), then the right one with a failing burst
    wrong = endpoint_on(world.redis_url, "right-" + secrets.token_hex(8))
    out = run({**env, "UPSTASH_REDIS_REST_URL": wrong.url}, "work", "--queue", "s4up", code=1)
    assert "HTTP 401" in one_line(out)
    right = endpoint_on(world.redis_url, UPSTASH_TOKEN)
    up_env = {**env, "UPSTASH_REDIS_REST_URL": right.url}
    run(up_env, "enqueue", "s4_leak", "--queue", "s4up", "--max-attempts", "1")
    assert json.loads(run(up_env, "work", "--queue", "s4up", "--json").stdout)["failed"] == 1
    # ---- the HTTP API: 401s, a signed and a bearer burst, the failed job read back
    api = {"Authorization": f"Bearer {API_TOKEN}"}
    job = httpx.post(f"{server.url}/api/jobs", headers=api, json={"type": "s4_leak", "payload": {},
                                                                   "max_attempts": 1}).json()["id"]
    for headers in ({"Authorization": "Bearer " + WRONG_REDIS_PW}, {"Authorization": f"Bearer {WORKER_SECRET}"}):
        assert httpx.get(f"{server.url}/api/jobs", headers=headers).status_code == 401
    assert httpx.post(f"{server.url}/api/workers", headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 401
    assert httpx.post(f"{server.url}/api/workers", headers={"Upstash-Signature": jwt.encode(
        {"iss": "Upstash"}, "not-the-key-" + secrets.token_hex(16), algorithm="HS256")}).status_code == 401
    reply = httpx.post(f"{server.url}/api/workers", headers={"Authorization": f"Bearer {WORKER_SECRET}"},
                       json={"max_jobs": 10}, timeout=60)
    assert reply.status_code == 200 and reply.json()["failed"] >= 1
    detail = httpx.get(f"{server.url}/api/jobs/{job}", headers=api)
    assert detail.json()["status"] == "failed" and "***" in detail.json()["error"]
    outputs += [reply.text, detail.text, httpx.get(f"{server.url}/api/jobs", headers=api).text]
    # ---- scheduled runs: one with a failing job, one whose Redis cannot be reached
    runs = tmp_path / "runs"
    run(env, "enqueue", "s4_leak", "--queue", WORLD_QUEUE, "--max-attempts", "1")
    runner = [sys.executable, str(ROOT / "scheduled" / "run_worker.py"), "--runs-dir", str(runs), "--queue",
              WORLD_QUEUE, "--max-jobs", "5"]
    ok = subprocess.run(runner, env=env, capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr
    failing = subprocess.run(runner, env={**env, **broken["unreachable redis"]}, capture_output=True, text=True,
                             timeout=180)
    assert failing.returncode == 1 and "BackendUnavailable" in failing.stderr, failing.stderr
    outputs += [ok.stdout, ok.stderr, failing.stdout, failing.stderr]
    notebooks = sorted(runs.rglob("*.ipynb"))
    assert len(notebooks) == 2 and any("redis://:***@" in p.read_text() for p in notebooks)
    # ---- Redis goes away under the server: 503s, logged (redacted) by the server
    redis_text = []
    client = redis.Redis.from_url(world.redis_url, decode_responses=False)
    for key in client.scan_iter(match="*"):
        kind = client.type(key)
        redis_text.append(repr(key))
        if kind == b"zset":
            redis_text += [repr(m) for m in client.zrange(key, 0, -1)]
        elif kind == b"hash":
            redis_text += [repr(kv) for kv in client.hgetall(key).items()]
        elif kind == b"string":
            redis_text.append(repr(client.get(key)))
    client.close()
    world.redis.stop()
    assert httpx.get(f"{server.url}/api/health", timeout=60).status_code == 503
    down = httpx.post(f"{server.url}/api/workers", headers={"Authorization": f"Bearer {WORKER_SECRET}"}, timeout=60)
    assert down.status_code == 503
    outputs.append(down.text)
    wait_for(lambda: "QKIT_REDIS_URL=redis://:***@" in server.log_path.read_text(errors="replace"),
             what="the server to log the unreachable Redis")
    log = server.log_path.read_text(errors="replace")

    # ---- grep everything that was written
    files = [p for folder in (tmp_path, world.folder) for p in folder.rglob("*")
             if p.is_file() and p.stat().st_size < 50_000_000 and "redis" not in p.relative_to(folder).parts[:1]]
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name.endswith(".ipynb.log") for p in files)
    haystacks = {"process outputs": "\n".join(outputs), "server log": log, "ledger": _ledger_text(world.database_url),
                 "redis": "\n".join(redis_text),
                 **{str(p): p.read_bytes().decode("utf-8", "replace") for p in files}}
    # the messages are there, with every secret masked (bare passwords too)
    assert "cannot reach" in haystacks["ledger"] and "(passwords ['***', '***'])" in haystacks["ledger"]
    leaks = {(where, s) for where, hay in haystacks.items() for s in SENTINELS if s in hay}
    assert not leaks, sorted(leaks)

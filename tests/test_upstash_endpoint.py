"""The local Upstash REST endpoint and the Upstash backend, against real servers.

A real /usr/bin/redis-server (and a one-node Redis Cluster) behind
``qkit.dev.upstash`` served by uvicorn in a thread; the unmodified
``upstash_redis.Redis`` client (``rest_retries=0`` so a bug fails at once
instead of sleeping 3 s and re-sending) for protocol behaviour; raw httpx where
the exact HTTP status and body shape matter.  No fakes, no mocks.
"""
from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import upstash_redis
from upstash_redis.errors import UpstashError

from qkit.backends.upstash import TOKEN_VAR, URL_VAR, UpstashBackend, UpstashUnauthorized
from qkit.dev.servers import free_port
from qkit.errors import BackendUnavailable, ConfigError, QkitError
from qkit.lua import Script
from qkit.dev.upstash import DEFAULT_MAX_BODY_BYTES, FaultPlan, create_app, start_in_thread

# Random per run, so "the token never appears" cannot pass by accident.
TOKEN = "qkit-test-" + secrets.token_hex(12)
NOSCRIPT = "NOSCRIPT No matching script. Please use EVAL."
EXECABORT = "EXECABORT Transaction discarded because of previous errors."
WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"
CROSSSLOT = "CROSSSLOT Keys in request don't hash to the same slot"

INCR_LUA = """\
-- test-only: count a call.
-- KEYS: [1] a counter key
-- ARGV: none
-- returns: the counter after the increment (integer)
return redis.call('INCR', KEYS[1])
"""


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def endpoint(module_redis, endpoint_on):
    return endpoint_on(module_redis.url, TOKEN)


@pytest.fixture(autouse=True)
def clean_state(request):
    """Each test starts with an empty database, no cached scripts and default knobs."""
    if "endpoint" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("module_redis")
    app = request.getfixturevalue("endpoint").app
    with server.client() as r:
        r.flushall()
        r.script_flush()
    app.state.latency_ms = 0.0
    app.state.faults.clear()
    app.state.faults.hang_seconds = 30.0
    app.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES
    app.state.stats.reset()
    yield
    app.state.faults.clear()  # a failed test must not leave faults armed for the next


@pytest.fixture
def client(endpoint):
    r = upstash_redis.Redis(endpoint.url, TOKEN, rest_retries=0, allow_telemetry=False)
    yield r
    r.close()


@pytest.fixture
def rds(module_redis):
    """redis-py straight to the server, to check what the endpoint really did."""
    with module_redis.client() as r:
        yield r


@pytest.fixture
def backend(endpoint):
    b = UpstashBackend(endpoint.url, TOKEN, timeout=5.0)
    yield b
    b.close()


def post(url: str, body, token: str | bytes | None = TOKEN, b64: bool = False, **kw) -> httpx.Response:
    """One raw request, to check exact statuses and body shapes."""
    headers: dict[str, str | bytes] = {}
    if token is not None:
        headers["Authorization"] = b"Bearer " + token if isinstance(token, bytes) else f"Bearer {token}"
    if b64:
        headers["Upstash-Encoding"] = "base64"
    return httpx.post(url, json=body, headers=headers, timeout=10, **kw)


def script_from_file(tmp_path: Path, source: str) -> Script:
    """A Script read from a temporary .lua file (unique text, so Redis has not seen it)."""
    path = tmp_path / f"t_{secrets.token_hex(4)}.lua"
    path.write_text(f"-- {path.name}\n{source}", encoding="utf-8")
    return Script.from_source(path.stem, path.read_text(encoding="utf-8"))


#: the test-only script (it echoes KEYS and ARGV), kept out of the runtime package
ECHO = Script.from_source("_echo", (Path(__file__).parent / "lua" / "echo.lua").read_text(encoding="utf-8"))


def run_echo(backend, keys: list, args: list):
    """Run :data:`ECHO` on ``backend`` (arguments sent as strings, as ``Backend.run`` sends them)."""
    return backend.run_script(ECHO, list(keys), [str(a) for a in args])


# --------------------------------------------------------------------------- plain commands
def test_set_get_and_ok_stays_plain(client, endpoint):
    assert client.set("greeting", "héllo") is True
    assert client.get("greeting") == "héllo"
    assert client.get("missing") is None
    # base64 mode: "OK" is sent as is, every other string encoded (§2.5).
    assert post(endpoint.url + "/", ["SET", "k", "OK"], b64=True).json() == {"result": "OK"}
    assert post(endpoint.url + "/", ["GET", "k"], b64=True).json() == {"result": "OK"}
    assert post(endpoint.url + "/", ["SET", "k", "bar"], b64=True).json() == {"result": "OK"}
    assert post(endpoint.url + "/", ["GET", "k"], b64=True).json() == {"result": "YmFy"}
    assert post(endpoint.url + "/", ["GET", "k"]).json() == {"result": "bar"}


def test_hset_hgetall(client):
    assert client.hset("h", values={"a": "1", "b": "zéro", "c": "0"}) == 3
    assert client.hgetall("h") == {"a": "1", "b": "zéro", "c": "0"}


def test_zadd_zpopmin_scores_and_numbers(client, endpoint):
    assert client.zadd("{q}:d", {"j1": 1700000000.5, "j2": 2}) == 2
    assert client.zpopmin("{q}:d") == [("j2", 2.0)]
    # JSON numbers reach Redis as the literal text the client sent.
    assert post(endpoint.url + "/", ["ZSCORE", "{q}:d", "j1"]).json() == {"result": "1700000000.5"}


def test_eval_keys_args_and_non_ascii_roundtrip(client):
    text = "héllo ✓ 日本語 🚀"
    assert client.eval("return ARGV[1]", keys=["{q}:k"], args=[text]) == text
    assert client.eval("return KEYS[1] .. '|' .. ARGV[1] .. '|' .. ARGV[2]",
                       keys=["{q}:ключ"], args=[1, 2.5]) == "{q}:ключ|1|2.5"
    assert client.eval("return {1, ARGV[1], {KEYS[1]}, false}", keys=["{q}:k"], args=["hi"]) == [
        1, "hi", ["{q}:k"], None,
    ]


def test_eval_nested_reply_wire_shape(endpoint):
    reply = post(endpoint.url + "/", ["EVAL", "return {1,ARGV[1],{KEYS[1]},false}", 1, "{q}:k", "hi"], b64=True)
    assert reply.status_code == 200
    assert reply.json() == {"result": [1, "aGk=", ["e3F9Oms="], None]}


def test_redis_errors_keep_full_text(client, endpoint):
    reply = post(endpoint.url + "/", ["GET"])
    assert (reply.status_code, reply.json()) == (400, {"error": "ERR wrong number of arguments for 'get' command"})
    client.rpush("list", "x")
    with pytest.raises(UpstashError, match=f"^{WRONGTYPE}$"):
        client.get("list")


def test_evalsha_noscript_error_text(client, endpoint):
    with pytest.raises(UpstashError) as caught:
        client.evalsha("0" * 40)
    assert str(caught.value) == NOSCRIPT
    reply = post(endpoint.url + "/", ["EVALSHA", "0" * 40, 0])
    assert (reply.status_code, reply.json()) == (400, {"error": NOSCRIPT})
    sha = client.script_load("return 'loaded'")
    assert client.evalsha(sha) == "loaded"


# --------------------------------------------------------------------------- pipelines and transactions
def test_pipeline_with_per_item_error(client, endpoint, rds):
    body = [["SET", "a", "1"], ["LPUSH", "a", "x"], ["INCR", "a"], ["GET", "nokey"]]
    reply = post(endpoint.url + "/pipeline", body, b64=True)
    assert reply.status_code == 200
    assert reply.json() == [{"result": "OK"}, {"error": WRONGTYPE}, {"result": 2}, {"result": None}]
    # The client raises on the first error item, though every command ran.
    pipe = client.pipeline()
    pipe.set("b", "1")
    pipe.lpush("b", "x")
    pipe.incr("b")
    with pytest.raises(UpstashError, match="WRONGTYPE"):
        pipe.exec()
    assert rds.get("b") == "2"
    pipe = client.pipeline()
    pipe.set("c", "5")
    pipe.incr("c")
    pipe.get("c")
    assert pipe.exec() == [True, 6, "6"]
    assert endpoint.app.state.stats.by_route["/pipeline"] == 3


def test_multi_exec(client, endpoint, rds):
    tx = client.multi()
    tx.set("t", "1")
    tx.incr("t")
    tx.hset("th", values={"f": "v"})
    assert tx.exec() == [True, 2, 1]
    # A runtime error does not roll back: per-item error, the rest committed.
    reply = post(endpoint.url + "/multi-exec", [["SET", "t", "1"], ["INCR", "t"], ["LPUSH", "t", "x"]], b64=True)
    assert reply.status_code == 200
    assert reply.json() == [{"result": "OK"}, {"result": 2}, {"error": WRONGTYPE}]
    assert rds.get("t") == "2"


def test_multi_exec_execabort_shape(endpoint, rds):
    reply = post(endpoint.url + "/multi-exec", [["SET", "t", "1"], ["GET"]])
    assert (reply.status_code, reply.json()) == (400, {"error": EXECABORT})
    assert rds.exists("t") == 0
    # A refused command discards the transaction as a queue-time error would; nothing runs.
    reply = post(endpoint.url + "/multi-exec", [["SET", "t", "1"], ["BLPOP", "l", "0"]])
    assert (reply.status_code, reply.json()) == (400, {"error": EXECABORT})
    assert rds.exists("t") == 0


# --------------------------------------------------------------------------- auth, refusals, HTTP edges
def test_wrong_missing_and_non_ascii_token_are_401(endpoint, rds):
    wrong = upstash_redis.Redis(endpoint.url, "not-the-token", rest_retries=0, allow_telemetry=False)
    try:
        with pytest.raises(UpstashError, match="^WRONGPASS invalid or missing auth token$"):
            wrong.set("k", "v")
    finally:
        wrong.close()
    expected = {"error": "WRONGPASS invalid or missing auth token"}
    for token in ("nope", None, "ñandú-✓".encode("utf-8"), TOKEN.encode() + b"\xff"):
        reply = post(endpoint.url + "/", ["SET", "k", "v"], token=token)
        assert (reply.status_code, reply.json()) == (401, expected), token
    for header in (f"Basic {TOKEN}", "Bearer"):
        reply = httpx.post(endpoint.url + "/pipeline", json=[["SET", "k", "v"]],
                           headers={"Authorization": header})
        assert (reply.status_code, reply.json()) == (401, expected)
    assert rds.exists("k") == 0
    assert endpoint.app.state.stats.unauthorized == 7


def test_refused_blocking_and_connection_commands(client, endpoint, rds):
    with pytest.raises(UpstashError, match="^ERR command is not available over REST: BLPOP$"):
        client.execute(["BLPOP", "l", 0])
    for command in (["blpop", "l", "0"], ["SELECT", "1"], ["CLIENT", "KILL", "x"], ["MULTI"],
                    ["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]):
        reply = post(endpoint.url + "/", command)
        assert reply.status_code == 400
        assert reply.json() == {"error": f"ERR command is not available over REST: {command[0].upper()}"}
    # XREAD without BLOCK is fine.
    assert post(endpoint.url + "/", ["XREAD", "STREAMS", "s", "0"]).json() == {"result": None}
    # In a pipeline the refusal is per item and the other commands still run.
    reply = post(endpoint.url + "/pipeline", [["SET", "p", "1"], ["BRPOP", "l", "0"], ["INCR", "p"]])
    assert reply.json() == [
        {"result": "OK"}, {"error": "ERR command is not available over REST: BRPOP"}, {"result": 2},
    ]
    assert rds.get("p") == "2"


def test_http_edges_are_json(endpoint):
    base = endpoint.url
    reply = post(base + "/set/foo/bar", [])
    assert (reply.status_code, reply.json()) == (404, {"error": "Not Found"})
    reply = httpx.get(base + "/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (reply.status_code, reply.json()) == (405, {"error": "Method Not Allowed"})
    bad = httpx.post(base + "/", content=b"{not json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 400 and "error" in bad.json()
    for body in (["SET", "k", True], ["SET", "k", None], ["SET", "k", {"a": 1}], [], {"cmd": "GET"}):
        reply = post(base + "/", body)
        assert reply.status_code == 400 and "error" in reply.json(), body
    nan = httpx.post(base + "/", content=b'["SET","k",NaN]', headers={"Authorization": f"Bearer {TOKEN}"})
    assert nan.status_code == 400
    assert post(base + "/pipeline", []).status_code == 400
    fmt = httpx.post(base + "/", json=["PING"], headers={"Authorization": f"Bearer {TOKEN}",
                                                          "Upstash-Response-Format": "resp2"})
    assert fmt.status_code == 400 and "error" in fmt.json()


def test_body_size_limit(endpoint, rds):
    endpoint.app.state.max_body_bytes = 1024
    reply = post(endpoint.url + "/", ["SET", "big", "x" * 2000])
    assert (reply.status_code, reply.json()) == (400, {"error": "ERR max request size exceeded"})
    # Also when the length is not declared up front (chunked body).
    chunked = httpx.post(
        endpoint.url + "/",
        content=iter([b'["SET","big","', b"y" * 2000, b'"]']),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert (chunked.status_code, chunked.json()) == (400, {"error": "ERR max request size exceeded"})
    assert rds.exists("big") == 0
    assert post(endpoint.url + "/", ["SET", "small", "x" * 500]).status_code == 200


def test_latency_injection(client, endpoint):
    stats = endpoint.app.state.stats
    endpoint.app.state.latency_ms = 200.0
    started = time.perf_counter()
    assert client.get("nothing") is None
    elapsed = time.perf_counter() - started
    assert stats.latency_sleeps == 1
    assert elapsed >= 0.2  # a lower bound: the sleep happened on this request's path
    endpoint.app.state.latency_ms = 0.0
    client.get("nothing")
    assert stats.latency_sleeps == 1


def test_unreachable_redis_gives_json_500(tmp_path):
    dead = start_in_thread(create_app(f"redis://127.0.0.1:{free_port()}/0", TOKEN))
    try:
        reply = post(dead.url + "/", ["PING"])
        assert reply.status_code == 500
        assert reply.json() == {"error": "ERR the dev endpoint cannot reach its Redis server"}
        backend = UpstashBackend(dead.url, TOKEN, timeout=5)
        with pytest.raises(BackendUnavailable) as caught:
            backend.ping()
        assert URL_VAR in str(caught.value) and TOKEN not in str(caught.value)
        backend.close()
    finally:
        dead.stop()


def test_token_and_bodies_never_logged(endpoint, client, caplog):
    secret_value = "payload-" + secrets.token_hex(8)
    with caplog.at_level(logging.DEBUG):
        client.set("k", secret_value)
        post(endpoint.url + "/", ["SET", "k", secret_value], token=TOKEN + "x")
        httpx.post(endpoint.url + f"/?_token={TOKEN}", json=["GET", secret_value])
        post(endpoint.url + f"/set/{secret_value}/{TOKEN}", [])
        post(endpoint.url + "/", ["GET", "k"], token=None)
    # Only the server's loggers: httpx logs the test's own request URLs client-side.
    text = "\n".join(
        f"{record.name} {record.getMessage()}"
        for record in caplog.records
        if record.name.startswith(("qkit", "uvicorn", "starlette"))
    )
    assert "POST / 200" in text and "POST <other> 404" in text  # the access log did run
    assert TOKEN not in text and secret_value not in text


def test_cli_module_serves(module_redis, tmp_path):
    port = free_port()
    # The token travels in the environment, as the CLI help recommends (argv is visible in ps).
    paths = [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "UPSTASH_REDIS_REST_TOKEN": TOKEN, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkit.dev.upstash", "--redis-url", module_redis.url,
         "--port", str(port), "--latency-ms", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:  # poll until it listens
            assert proc.poll() is None, proc.stdout.read()
            try:
                reply = post(f"http://127.0.0.1:{port}/", ["PING"])
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the CLI endpoint never listened"
                time.sleep(0.05)
        assert (reply.status_code, reply.json()) == (200, {"result": "PONG"})
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert "Upstash-compatible endpoint" in output
    assert TOKEN not in output


# --------------------------------------------------------------------------- UpstashBackend
def test_backend_noscript_fallback_then_evalsha(backend, endpoint, tmp_path):
    script = script_from_file(tmp_path, "return {KEYS[1], ARGV[1], ARGV[2]}\n")
    stats = endpoint.app.state.stats
    assert backend.run_script(script, ["{q}:k"], ["ünï", "2"]) == ["{q}:k", "ünï", "2"]
    # EVALSHA answered NOSCRIPT, then EVAL: two commands, two requests.
    assert backend.counters() == {"commands": 2, "requests": 2}
    assert stats.requests == 2
    assert backend.run_script(script, ["{q}:k"], ["a", "b"]) == ["{q}:k", "a", "b"]
    # The EVAL cached the script: one EVALSHA now.
    assert backend.counters() == {"commands": 3, "requests": 3}
    assert stats.requests == 3


def test_backend_run_named_script_stringifies(backend):
    assert ECHO.source.startswith("-- echo.lua")
    assert run_echo(backend, ["{q}:a", "{q}:b"], [1, 2.5, "x"]) == [["{q}:a", "{q}:b"], ["1", "2.5", "x"]]
    assert run_echo(backend, [], []) == [[], []]
    # a shipped script by name, with a non-string argument (sent as its text)
    keys = [f"qkit:{{q}}:{part}" for part in ("ready", "delayed", "leased", "owners", "dead", "prio")]
    reply = backend.run("locate", keys, [42])
    assert isinstance(reply[0], int) and reply[0] > 0 and reply[3] == 0 and set(reply[1:3] + reply[4:]) == {None}


def test_backend_script_error_is_qkit_error(backend, tmp_path):
    script = script_from_file(tmp_path, "return redis.error_reply('BADSTATE job 7 is not processing')\n")
    with pytest.raises(QkitError) as caught:
        backend.run_script(script, [], [])
    assert not isinstance(caught.value, BackendUnavailable)
    assert str(caught.value) == f"Redis refused script {script.name}: BADSTATE job 7 is not processing"
    crash = script_from_file(tmp_path, "return redis.call('NOSUCHCOMMAND')\n")
    with pytest.raises(QkitError, match="Unknown Redis command") as caught:
        backend.run_script(crash, [], [])
    assert not isinstance(caught.value, BackendUnavailable)


def test_backend_pipeline_matches_redis_py(backend, rds):
    rds.hset("{q}:jobs", mapping={"1": '{"a": 1}', "2": "ü"})
    rds.zadd("{q}:ready", {"j1": 1.5, "j2": 3})
    rds.rpush("{q}:dead", "x", "y")
    rds.set("{q}:n", "5", ex=100)
    commands = [
        ["HGETALL", "{q}:jobs"], ["HGET", "{q}:jobs", "2"], ["HLEN", "{q}:jobs"],
        ["ZSCORE", "{q}:ready", "j1"], ["ZRANGE", "{q}:ready", 0, -1, "WITHSCORES"],
        ["ZRANGEBYSCORE", "{q}:ready", "-inf", "+inf"], ["ZCARD", "{q}:ready"],
        ["LRANGE", "{q}:dead", 0, -1], ["GET", "{q}:n"], ["GET", "{q}:missing"],
        ["EXISTS", "{q}:n", "{q}:missing"], ["TYPE", "{q}:ready"], ["PING"], ["TIME"],
    ]
    got = backend.pipeline(commands)
    pipe = rds.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    expected = pipe.execute()
    assert got[:-1] == expected[:-1]  # TIME differs by the clock, compare its shape
    assert type(got[-1]) is type(expected[-1]) and len(got[-1]) == 2
    assert backend.counters() == {"commands": len(commands), "requests": 1}
    assert backend.pipeline([]) == [] and backend.counters()["requests"] == 1


def test_backend_pipeline_error_is_qkit_error(backend, rds):
    rds.rpush("l", "x")
    with pytest.raises(QkitError, match=WRONGTYPE) as caught:
        backend.pipeline([["GET", "l"], ["LLEN", "l"]])
    assert not isinstance(caught.value, BackendUnavailable)


def test_backend_ping_and_describe(backend, endpoint):
    assert backend.ping() is True
    assert backend.kind == "upstash"
    assert backend.describe() == endpoint.url
    b = UpstashBackend("https://user:pw@db.upstash.io/", TOKEN)
    assert b.describe() == "https://db.upstash.io" and "pw" not in b.describe()
    b.close()


def test_backend_wrong_url_is_one_line(endpoint):
    b = UpstashBackend(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2)
    for call in (b.ping, lambda: run_echo(b, [], []), lambda: b.pipeline([["PING"]])):
        with pytest.raises(BackendUnavailable) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and URL_VAR in message and TOKEN not in message
    b.close()


def test_backend_wrong_token_is_one_line(endpoint):
    wrong = "wrong-" + secrets.token_hex(8)
    b = UpstashBackend(endpoint.url, wrong, timeout=2)
    for call in (b.ping, lambda: run_echo(b, [], []), lambda: b.pipeline([["PING"]])):
        with pytest.raises(UpstashUnauthorized) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and TOKEN_VAR in message
        assert wrong not in message and TOKEN not in message
    b.close()


def test_backend_top_level_pipeline_error_is_qkit_error(backend, endpoint):
    # A top-level {"error"} for /pipeline would be an AttributeError inside the client.
    endpoint.app.state.max_body_bytes = 1024
    with pytest.raises(QkitError, match="^ERR max request size exceeded$") as caught:
        backend.pipeline([["GET", "x" * 2000]])
    assert not isinstance(caught.value, BackendUnavailable)


def test_backend_against_something_that_is_not_upstash():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def not_upstash(request):
        return JSONResponse({"status": "fine"})

    app = Starlette(routes=[Route("/", not_upstash, methods=["POST"]),
                            Route("/pipeline", not_upstash, methods=["POST"])])
    other = start_in_thread(app)
    b = UpstashBackend(other.url, TOKEN, timeout=2)
    try:
        for call in (b.ping, lambda: b.pipeline([["PING"]])):
            with pytest.raises(BackendUnavailable, match=f"does not answer like Upstash.*{URL_VAR}"):
                call()
    finally:
        b.close()
        other.stop()


def test_backend_is_thread_safe(backend):
    script = ECHO
    results: list = []

    def work(n: int) -> None:
        for i in range(10):
            results.append(backend.run_script(script, [f"{{q}}:{n}"], [str(i)]) == [[f"{{q}}:{n}"], [str(i)]])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 80
    # 80 EVALSHA, plus an EVAL for each thread that raced past the first NOSCRIPT.
    counters = backend.counters()
    assert counters["commands"] == counters["requests"] and 81 <= counters["requests"] <= 88


def test_backend_config_errors_never_echo_token():
    with pytest.raises(ConfigError, match=URL_VAR):
        UpstashBackend("db.upstash.io", TOKEN)
    with pytest.raises(ConfigError, match=URL_VAR) as caught:
        UpstashBackend(f"https://db.upstash.io/?_token={TOKEN}", TOKEN)
    assert TOKEN not in str(caught.value)
    with pytest.raises(ConfigError, match=TOKEN_VAR):
        UpstashBackend("https://db.upstash.io", "")
    with pytest.raises(ConfigError, match=TOKEN_VAR) as caught:
        UpstashBackend("https://db.upstash.io", "sécret-token")
    assert "sécret" not in str(caught.value)


# --------------------------------------------------------------------------- fault injection
@pytest.mark.parametrize(
    ("action", "applied", "fragment"),
    [
        ("drop_before", False, "cannot reach Upstash"),
        ("drop_after", True, "cannot reach Upstash"),
        ("500_before", False, "HTTP 500"),
        ("500_json_before", False, "HTTP 500: ERR injected server error"),
        ("500_after", True, "HTTP 500"),
    ],
)
def test_backend_faults_surface_as_backend_unavailable(backend, endpoint, rds, tmp_path, action, applied, fragment):
    script = script_from_file(tmp_path, INCR_LUA)
    rds.script_load(script.source)  # skip the NOSCRIPT round trip: one request per call
    endpoint.app.state.faults.arm(action)
    with pytest.raises(BackendUnavailable) as caught:
        backend.run_script(script, ["{q}:calls"], [])
    message = str(caught.value)
    assert fragment in message and URL_VAR in message and "\n" not in message and TOKEN not in message
    # rest_retries=0 and no blind retry: one request, and the write ran exactly when the fault let it.
    assert backend.counters()["requests"] == 1
    assert rds.get("{q}:calls") == ("1" if applied else None)
    assert endpoint.app.state.faults.fired == [action]


def test_backend_timeout_after_the_write(endpoint, rds, tmp_path):
    script = script_from_file(tmp_path, INCR_LUA)
    rds.script_load(script.source)
    endpoint.app.state.faults.hang_seconds = 20
    endpoint.app.state.faults.arm("timeout_after")
    b = UpstashBackend(endpoint.url, TOKEN, timeout=0.5)
    try:
        started = time.perf_counter()
        with pytest.raises(BackendUnavailable, match="did not answer within 0.5 s") as caught:
            b.run_script(script, ["{q}:calls"], [])
        assert time.perf_counter() - started < 10  # the client gave up; it did not wait for the hang
        assert TOKEN not in str(caught.value)
        assert rds.get("{q}:calls") == "1"  # the write was applied: callers must recover, not replay
    finally:
        b.close()


def test_backend_idempotent_retry_and_pipeline_fault(backend, endpoint, rds, tmp_path):
    script = script_from_file(tmp_path, "return ARGV[1]\n")
    rds.script_load(script.source)
    endpoint.app.state.faults.arm("drop_before")
    assert backend.run_script(script, [], ["same"], idempotent=True) == "same"
    assert backend.counters() == {"commands": 2, "requests": 2}
    endpoint.app.state.faults.arm("drop_before")
    with pytest.raises(BackendUnavailable, match=URL_VAR):
        backend.pipeline([["PING"], ["GET", "x"]])
    assert backend.pipeline([["PING"]]) == [True]


def test_fault_plan_rejects_unknown_actions():
    with pytest.raises(ValueError):
        FaultPlan(["explode"])


# --------------------------------------------------------------------------- one-node cluster
@pytest.fixture(scope="module")
def cluster_endpoint(module_cluster, endpoint_on):
    return endpoint_on(module_cluster.url, TOKEN)


def test_cluster_crossslot_through_endpoint(cluster_endpoint):
    r = upstash_redis.Redis(cluster_endpoint.url, TOKEN, rest_retries=0, allow_telemetry=False)
    script = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return ARGV[1]"
    try:
        with pytest.raises(UpstashError) as caught:
            r.eval(script, keys=["qkit:emails:ready", "qkit:emails:jobs"], args=["v"])
        assert str(caught.value) == CROSSSLOT
        assert r.eval(script, keys=["qkit:{emails}:ready", "qkit:{emails}:jobs"], args=["v"]) == "v"
        assert r.get("qkit:{emails}:jobs") == "v"
    finally:
        r.close()
    reply = post(cluster_endpoint.url + "/", ["EVAL", script, 2, "a", "b", "v"])
    assert (reply.status_code, reply.json()) == (400, {"error": CROSSSLOT})
    # A transaction spanning slots is refused at EXEC with CROSSSLOT (Redis 7.0).
    reply = post(cluster_endpoint.url + "/multi-exec", [["SET", "a", "1"], ["SET", "b", "1"]])
    assert (reply.status_code, reply.json()) == (400, {"error": CROSSSLOT})
    b = UpstashBackend(cluster_endpoint.url, TOKEN)
    try:
        with pytest.raises(QkitError, match=f"^Redis refused script _echo: {CROSSSLOT}$"):
            run_echo(b, ["qkit:a:x", "qkit:b:y"], [])
        assert run_echo(b, ["qkit:{a}:x", "qkit:{a}:y"], []) == [["qkit:{a}:x", "qkit:{a}:y"], []]
    finally:
        b.close()

"""The real HTTP handlers (qkit/engine/http_handlers.py) against real local HTTP servers started here:
200, 429 with Retry-After, 500, slow and malformed answers; the API key never in logs, errors or results."""
from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from sqlalchemy import select

import qkit
from conftest import ROOT, Setup
from http_upstream import Reply, Upstream
from qkit.engine import handlers as registry
from qkit.ledger import job_attempts, job_events, jobs, worker_runs

KEY = "sk-or-v1-TESTKEY-5f2b8c0d9e7a41"
HTTP_TYPES = ("ai_text_generation", "ai_image_generation", "web_scraping", "scheduled_publish")
CHAT = "/api/v1/chat/completions"
CHAT_OK = {"id": "gen-1", "model": "openai/gpt-4o-mini", "usage": {"prompt_tokens": 3, "completion_tokens": 5},
           "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello!"}}]}


@pytest.fixture
def real_handlers(monkeypatch):
    """The HTTP handlers in this process's registry for one test; the simulated ones back afterwards."""
    saved = {t: registry.get_handler(t) for t in HTTP_TYPES}
    sys.modules.pop("qkit.engine.http_handlers", None)
    import qkit.engine.http_handlers  # noqa: F401 - registers on import, as QKIT_HANDLERS does

    yield
    for t, h in saved.items():
        registry._registry[t] = h


@pytest.fixture
def up(monkeypatch):
    with Upstream() as server:
        monkeypatch.setenv("QKIT_OPENAI_BASE_URL", server.url + "/api/v1")
        monkeypatch.setenv("QKIT_OPENAI_API_KEY", KEY)
        for name in ("QKIT_IMAGES_BASE_URL", "QKIT_IMAGES_API_KEY", "QKIT_FIRECRAWL_URL", "QKIT_FIRECRAWL_API_KEY",
                     "QKIT_PUBLISH_WEBHOOK_SECRET", "QKIT_HTTP_TIMEOUT", "QKIT_SCRAPE_MAX_BYTES"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("QKIT_PUBLISH_WEBHOOK_URL", server.url + "/hooks/publish")
        yield server


@pytest.fixture
def hq(embedded_home, tmp_path, real_handlers):
    """A queue on the embedded server with a fresh SQLite ledger, back-off off (retries at once)."""
    q = qkit.connect(f"http-{time.monotonic_ns()}", home=embedded_home,
                     database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", backoff_base=0)
    yield q
    q.close()


def attempts_of(q, job_id):
    with q.ledger.read_engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(job_attempts).where(job_attempts.c.job_id == job_id)
                                              .order_by(job_attempts.c.attempt)).mappings()]


def test_text_generation_200(hq, up):
    up.script(CHAT, Reply(200, CHAT_OK))
    job_id = hq.enqueue("ai_text_generation", {"prompt": "Say hello", "max_tokens": 20})
    assert hq.work().completed == 1
    job = hq.get(job_id)
    assert job.result == {"text": "Hello!", "model": "openai/gpt-4o-mini", "id": "gen-1", "finish_reason": "stop",
                          "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
    (call,) = up.requests(CHAT)
    assert call.method == "POST" and call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.json() == {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}],
                           "max_tokens": 20}
    assert (job.progress, job.progress_note) == (1.0, "completed")


def test_429_retry_after_2_through_the_real_handler(hq, up):
    up.script(CHAT, Reply(429, {"error": {"message": "Rate limit exceeded"}}, headers={"Retry-After": "2"}),
              Reply(200, CHAT_OK))
    job_id = hq.enqueue("ai_text_generation", {"prompt": "hi"})
    assert hq.work(max_seconds=30).completed == 1
    first, second = attempts_of(hq, job_id)
    assert first["error"] == ("HTTPStatusError: the text-generation API answered 429 Too Many Requests: "
                              "Rate limit exceeded")
    assert first["retry_after_ms"] == 2000
    assert (second["started_at"] - first["finished_at"]).total_seconds() >= 2.0
    calls = up.requests(CHAT)
    assert calls[1].at - calls[0].at >= 2.0


def test_503_with_an_http_date_retry_after(hq, up):
    server_now = datetime.now(timezone.utc) - timedelta(hours=5)  # the server's clock is off: its Date counts
    up.script(CHAT, Reply(503, "down", headers={"Retry-After": format_datetime(server_now + timedelta(seconds=1),
                                                                                usegmt=True),
                                                 "Date": format_datetime(server_now, usegmt=True)}),
              Reply(200, CHAT_OK))
    job_id = hq.enqueue("ai_text_generation", {"prompt": "hi"})
    assert hq.work(max_seconds=30).completed == 1
    first, second = attempts_of(hq, job_id)
    assert first["retry_after_ms"] == 1000
    assert (second["started_at"] - first["finished_at"]).total_seconds() >= 1.0


def test_500_retries_with_the_backoff(hq, up):
    up.script(CHAT, Reply(500, {"error": {"message": "upstream exploded"}}), Reply(200, CHAT_OK))
    job_id = hq.enqueue("ai_text_generation", {"prompt": "hi"})
    assert hq.work(max_seconds=30).completed == 1
    first, _ = attempts_of(hq, job_id)
    assert first["outcome"] == "failed" and first["retry_after_ms"] is None
    assert "500 Internal Server Error: upstream exploded" in first["error"]


def test_slow_answer_is_a_timeout(hq, up, monkeypatch):
    monkeypatch.setenv("QKIT_HTTP_TIMEOUT", "0.5")
    up.script(CHAT, Reply(200, CHAT_OK, delay=3), Reply(200, CHAT_OK))
    job_id = hq.enqueue("ai_text_generation", {"prompt": "hi"}, max_attempts=2)
    t0 = time.monotonic()
    assert hq.work(max_seconds=30).completed == 1
    first, second = attempts_of(hq, job_id)
    assert first["outcome"] == "timeout" and "no answer within QKIT_HTTP_TIMEOUT" in first["error"]
    assert first["duration_ms"] < 2500 and second["outcome"] == "completed"
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("reply,why", [
    (Reply(200, "<html>a proxy's error page</html>", content_type="text/html"), "not JSON"),
    (Reply(200, {"choices": []}), "without choices[0].message.content"),
    (Reply(200, {"choices": [{"message": {"content": None}}]}), "content is not text"),
])
def test_malformed_answers_fail_the_attempt(hq, up, reply, why):
    up.script(CHAT, reply)
    job_id = hq.enqueue("ai_text_generation", {"prompt": "hi"}, max_attempts=2)
    hq.work(max_seconds=10)
    job = hq.get(job_id)
    assert job.status == "failed" and job.attempts == 2  # retried: a bad answer may be transient
    assert job.error.startswith("BadResponse: ") and why in job.error


def test_401_is_permanent_and_never_quotes_the_key(hq, up):
    up.script(CHAT, Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}))
    job_id = hq.enqueue("ai_text_generation", {"prompt": "hi"}, max_attempts=5)
    hq.work(max_seconds=10)
    job = hq.get(job_id)
    assert job.status == "failed" and job.attempts == 1
    assert job.error == "Permanent: the text-generation API answered 401 Unauthorized (check the API key)"


def test_400_quotes_the_service_with_the_key_masked(hq, up):
    up.script(CHAT, Reply(400, {"error": {"message": f"model 'nope' not found for key {KEY}"}}))
    job_id = hq.enqueue("ai_text_generation", {"prompt": "hi", "model": "nope"}, max_attempts=3)
    hq.work(max_seconds=10)
    job = hq.get(job_id)
    assert job.status == "failed" and job.attempts == 1 and KEY not in job.error
    assert job.error == "Permanent: the text-generation API answered 400 Bad Request: model 'nope' not found for key ***"


def test_missing_key_or_prompt_is_permanent(hq, up, monkeypatch):
    no_prompt = hq.enqueue("ai_text_generation", {"text": "no prompt field"})
    hq.work()
    assert hq.get(no_prompt).error == "Permanent: payload field 'prompt' must be a non-empty string"
    monkeypatch.delenv("QKIT_OPENAI_API_KEY")
    no_key = hq.enqueue("ai_text_generation", {"prompt": "hi"})
    hq.work()
    assert "QKIT_OPENAI_API_KEY is not set" in hq.get(no_key).error
    assert up.requests(CHAT) == []


def test_image_generation(hq, up):
    up.script("/api/v1/images/generations",
              Reply(200, {"created": 1, "data": [{"url": "https://cdn.example/img.png", "revised_prompt": "a cat"}]}),
              Reply(200, {"data": [{"b64_json": "aGVsbG8="}]}))
    a = hq.enqueue("ai_image_generation", {"prompt": "a cat", "size": "512x512"})
    b = hq.enqueue("ai_image_generation", {"prompt": "a dog"})
    assert hq.work().completed == 2
    assert hq.get(a).result == {"model": "dall-e-3", "size": "512x512", "revised_prompt": "a cat",
                                "image_url": "https://cdn.example/img.png"}
    assert hq.get(b).result["image_sha256"] == hashlib.sha256(b"aGVsbG8=").hexdigest()
    first = up.requests("/api/v1/images/generations")[0]
    assert first.headers["Authorization"] == f"Bearer {KEY}"
    assert first.json() == {"model": "dall-e-3", "prompt": "a cat", "n": 1, "size": "512x512"}


PAGE = ("<html><head><title> Example  Domain </title><style>p{}</style><script>var x=1</script></head>"
        "<body><h1>Example</h1><p>This domain is for use in examples.</p></body></html>")


def test_direct_scrape(hq, up, monkeypatch):
    up.script("/page", Reply(200, PAGE, content_type="text/html; charset=utf-8"))
    up.script("/logo.png", Reply(200, b"\x89PNG....", content_type="image/png"))
    up.script("/big", Reply(200, "x" * 5000, content_type="text/plain"))
    up.script("/gone", Reply(404, "no"))
    up.script("/slow-down", Reply(429, "later", headers={"Retry-After": "1"}), Reply(200, "ok", content_type="text/plain"))
    ok = hq.enqueue("web_scraping", {"url": up.url + "/page"})
    png = hq.enqueue("web_scraping", {"url": up.url + "/logo.png"})
    big = hq.enqueue("web_scraping", {"url": up.url + "/big"})
    gone = hq.enqueue("web_scraping", {"url": up.url + "/gone"})
    ftp = hq.enqueue("web_scraping", {"url": "ftp://example.org/x"})
    later = hq.enqueue("web_scraping", {"url": up.url + "/slow-down"})
    monkeypatch.setenv("QKIT_SCRAPE_MAX_BYTES", "4096")
    hq.work(max_seconds=30)
    r = hq.get(ok).result
    assert (r["title"], r["text"], r["status"], r["via"]) == ("Example Domain", "Example\nThis domain is for use in "
                                                             "examples.", 200, "direct")
    for job_id, why in ((png, "content type 'image/png'"), (big, "the cap is 4096"), (gone, "404 Not Found"),
                        (ftp, "must be an http(s) URL")):
        job = hq.get(job_id)
        assert job.status == "failed" and job.attempts == 1 and why in job.error, (job_id, job.error)
    assert hq.get(later).status == "completed" and attempts_of(hq, later)[0]["retry_after_ms"] == 1000


def test_scrape_through_a_firecrawl_style_api(hq, up, monkeypatch):
    monkeypatch.setenv("QKIT_FIRECRAWL_URL", up.url + "/fc")
    monkeypatch.setenv("QKIT_FIRECRAWL_API_KEY", "fc-" + KEY)
    up.script("/fc/v1/scrape", Reply(200, {"success": True, "data": {
        "markdown": "# Example", "metadata": {"title": "Example", "statusCode": 200}}}))
    job_id = hq.enqueue("web_scraping", {"url": "https://example.org"})
    assert hq.work().completed == 1
    assert hq.get(job_id).result == {"url": "https://example.org", "via": "scraping API", "status": 200,
                                     "title": "Example", "markdown": "# Example", "truncated": False}
    (call,) = up.requests("/fc/v1/scrape")
    assert call.headers["Authorization"] == f"Bearer fc-{KEY}"
    assert call.json() == {"url": "https://example.org", "formats": ["markdown"]}


def test_publish_webhook_signed_and_idempotent(hq, up, monkeypatch):
    monkeypatch.setenv("QKIT_PUBLISH_WEBHOOK_SECRET", "whsec-0123456789")
    up.script("/hooks/publish", Reply(502, "bad gateway"), Reply(201, {"id": 777}))
    job_id = hq.enqueue("scheduled_publish", {"channel": "blog", "title": "Launch", "body": "We are live"})
    assert hq.work(max_seconds=30).completed == 1
    assert hq.get(job_id).result == {"channel": "blog", "status": 201, "post_id": "777"}
    first, second = up.requests("/hooks/publish")
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == f"qkit-{hq.name}-{job_id}"
    assert json.loads(second.body) == {"job_id": job_id, "channel": "blog",
                                       "post": {"title": "Launch", "body": "We are live"}}
    expected = "sha256=" + hmac.new(b"whsec-0123456789", second.body, hashlib.sha256).hexdigest()
    assert second.headers["X-Qkit-Signature"] == expected


def test_the_key_never_reaches_logs_errors_or_results(embedded_home, tmp_path):
    """A burst in its own process, configured as a user would (QKIT_HANDLERS), against a server that echoes
    the key in every answer, with debug logging: the key is in no output and no ledger row."""
    db = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    setup = Setup("embedded-sqlite", "keyleak", embedded_home, {"home": embedded_home, "database_url": db},
                  {"QKIT_HOME": str(embedded_home), "QKIT_DATABASE_URL": db})
    q = setup.connect(backoff_base=0)
    with Upstream() as server:
        echo = {"error": {"message": f"bad key {KEY}"}, "key": KEY}
        server.script(CHAT, Reply(500, echo), Reply(429, echo, headers={"Retry-After": "0"}), Reply(401, echo),
                      Reply(400, echo), Reply(200, {**CHAT_OK, "echo": f"authorization: Bearer {KEY}"}))
        server.script("/api/v1/images/generations", Reply(403, echo))
        ids = [q.enqueue("ai_text_generation", {"prompt": f"p{i}"}, max_attempts=3) for i in range(4)]
        ids.append(q.enqueue("ai_image_generation", {"prompt": "x"}))
        env = setup.env(QKIT_HANDLERS="qkit.engine.http_handlers", QKIT_OPENAI_BASE_URL=server.url + "/api/v1",
                        QKIT_OPENAI_API_KEY=KEY, QKIT_LOG_LEVEL="DEBUG")
        script = ("import logging, qkit; logging.basicConfig(level=logging.DEBUG); "
                  f"q = qkit.connect({q.name!r}, backoff_base=0); print(q.work(max_seconds=20).to_dict())")
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
        cli = subprocess.run([sys.executable, "-m", "qkit.cli", "work", "--queue", q.name], env=env,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HTTP Request: POST" in out.stderr  # httpx's own log lines were on, and hold no key
    assert KEY not in out.stdout + out.stderr + cli.stdout + cli.stderr
    statuses = {q.get(i).status for i in ids}
    assert statuses <= {"completed", "failed"} and "failed" in statuses and "completed" in statuses
    with q.ledger.read_engine.connect() as conn:
        for table in (jobs, job_attempts, job_events, worker_runs):
            for row in conn.execute(select(table)).mappings():
                assert KEY not in json.dumps({k: str(v) for k, v in row.items()}), (table.name, dict(row))

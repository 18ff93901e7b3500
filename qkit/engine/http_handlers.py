"""Real HTTP handlers for the four built-in job types (docs/semantics.md#http-handlers).

Chosen by configuration: ``QKIT_HANDLERS=qkit.engine.http_handlers`` makes every
worker import this module, whose handlers then replace the simulated ones of
:mod:`qkit.engine.handlers` (which stay the default).  Each calls its service
with httpx:

=====================  ==============================================================
type                   service
=====================  ==============================================================
ai_text_generation     ``POST {QKIT_OPENAI_BASE_URL}/chat/completions`` (OpenAI /
                       OpenRouter shape), key ``QKIT_OPENAI_API_KEY``
ai_image_generation    ``POST {QKIT_IMAGES_BASE_URL}/images/generations``, key
                       ``QKIT_IMAGES_API_KEY`` (both default to the OpenAI ones)
web_scraping           ``POST {QKIT_FIRECRAWL_URL}/v1/scrape`` (key ``QKIT_FIRECRAWL_API_KEY``)
                       when set, else a direct GET of the payload's http(s) URL:
                       timeouts, a size cap, a content-type check
scheduled_publish      ``POST {QKIT_PUBLISH_WEBHOOK_URL}`` with an ``Idempotency-Key``
                       and, with ``QKIT_PUBLISH_WEBHOOK_SECRET``, an HMAC-SHA256 signature
=====================  ==============================================================

How a response ends the attempt: 2xx completes; 429 and 503 raise
``httpx.HTTPStatusError`` (so a ``Retry-After`` header sets the retry delay,
:func:`qkit.engine.lifecycle.directive`); other 5xx, 408 and 425 raise it too
(the back-off applies); any other 4xx, a missing key, a payload the service
cannot take, a page too large or of the wrong type raise ``qkit.Permanent``; a
request past ``QKIT_HTTP_TIMEOUT`` raises ``TimeoutError`` (outcome ``timeout``);
a 2xx that is not the JSON expected fails the attempt (retried).

Keys travel only in request headers: no message, error, result or log line of
this module holds a key, a webhook URL, or a response body echoing a key (the
key's text is masked in whatever the service says, and 401/403 bodies are
not quoted at all).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import httpx

from qkit.engine.handlers import current_job, handler
from qkit.engine.lifecycle import Permanent, RETRY_AFTER_STATUSES
from qkit.text import clip

#: statuses worth another attempt after the back-off (429 and 503 also carry Retry-After)
TRANSIENT_STATUSES = frozenset({408, 425, *RETRY_AFTER_STATUSES, 500, 502, 504})
DEFAULT_OPENAI_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_TEXT_MODEL = "openai/gpt-4o-mini"
DEFAULT_IMAGE_MODEL = "dall-e-3"
#: a direct fetch reads at most this many bytes (QKIT_SCRAPE_MAX_BYTES)
DEFAULT_SCRAPE_MAX_BYTES = 2 * 1024 * 1024
#: page text kept in a scraping result (the result cap is 256 KiB)
MAX_PAGE_TEXT = 20_000
SCRAPE_TYPES = ("text/html", "application/xhtml+xml", "text/plain", "application/json", "text/markdown")
USER_AGENT = "qkit-http-handlers/1"


class BadResponse(RuntimeError):
    """A service answered 2xx with something that is not what its API promises (retried: a proxy's page)."""


# ---------------------------------------------------------------- configuration
def _env(name: str, default: str | None = None) -> str | None:
    return (os.environ.get(name) or "").strip() or default


def _timeout() -> httpx.Timeout:
    """``QKIT_HTTP_TIMEOUT`` seconds (default 60) for a read, 10 s at most to connect."""
    raw = _env("QKIT_HTTP_TIMEOUT", "60")
    try:
        seconds = float(raw)  # type: ignore[arg-type]
    except ValueError:
        raise Permanent(f"QKIT_HTTP_TIMEOUT must be a number of seconds (got {clip(raw, 40)!r})") from None
    if not 0 < seconds < float("inf"):
        raise Permanent("QKIT_HTTP_TIMEOUT must be > 0 seconds")
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


def _key(*names: str) -> str:
    for name in names:
        value = _env(name)
        if value:
            return value
    raise Permanent(f"{names[0]} is not set: the real {current_type()} handler needs an API key")


def _base_url(name: str, default: str | None = None, *fallbacks: str) -> str:
    for candidate in (name, *fallbacks):
        value = _env(candidate)
        if value:
            break
    else:
        value = default
    if not value:
        raise Permanent(f"{name} is not set: the real {current_type()} handler has no service to call")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Permanent(f"{name} must be an http(s) URL")
    return value.rstrip("/")


def current_type() -> str:
    ctx = current_job()
    return ctx.type if ctx else "http"


# ---------------------------------------------------------------- one call
def _masked(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _service_message(response: httpx.Response, secrets: tuple[str, ...]) -> str:
    """What the service said about an error, masked and cut; nothing for 401/403 (may quote the key)."""
    if response.status_code in (401, 403):
        return ""
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        said = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
        said = said or (body.get("message") if isinstance(body, dict) else None)
    except ValueError:
        said = None
    return f": {clip(_masked(str(said), secrets), 200, one_line=True)}" if said else ""


def _check(response: httpx.Response, service: str, secrets: tuple[str, ...] = ()) -> None:
    """Raise for a non-2xx answer as the module docstring says; the message names no URL and no key."""
    status = response.status_code
    if 200 <= status < 300:
        return
    what = f"{service} answered {status} {response.reason_phrase}".rstrip()
    if status in TRANSIENT_STATUSES or status >= 500:
        raise httpx.HTTPStatusError(what + _service_message(response, secrets), request=response.request,
                                    response=response)
    hint = " (check the API key)" if status in (401, 403) else ""
    raise Permanent(what + hint + _service_message(response, secrets))


def _send(service: str, method: str, url: str, *, secrets: tuple[str, ...] = (), stream_cap: int | None = None,
          **kwargs: Any) -> tuple[httpx.Response, bytes]:
    """One request; returns the response and its body (at most ``stream_cap`` bytes: over it, Permanent).

    Transport failures become a ``TimeoutError`` (a timeout) or a ``ConnectionError`` (a failure),
    with a message naming the service only: httpx's own messages may carry the URL.
    """
    headers = {"User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
    try:
        with httpx.Client(timeout=_timeout(), follow_redirects=method == "GET", max_redirects=5) as client:
            with client.stream(method, url, headers=headers, **kwargs) as response:
                if stream_cap is None or not 200 <= response.status_code < 300:
                    body = response.read()
                else:
                    body = _read_capped(response, stream_cap, service)
    except httpx.TimeoutException as exc:
        raise TimeoutError(f"{service}: no answer within QKIT_HTTP_TIMEOUT ({type(exc).__name__})") from None
    except httpx.TooManyRedirects:
        raise Permanent(f"{service}: more than 5 redirects") from None
    except httpx.TransportError as exc:
        raise ConnectionError(f"{service}: {type(exc).__name__} (could not reach the service)") from None
    _check(response, service, secrets)
    return response, body


def _read_capped(response: httpx.Response, cap: int, service: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise Permanent(f"{service}: the page is {int(declared)} bytes; the cap is {cap} (QKIT_SCRAPE_MAX_BYTES)")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > cap:
            raise Permanent(f"{service}: the page is over {cap} bytes (QKIT_SCRAPE_MAX_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes, service: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise BadResponse(f"{service} answered 2xx with a body that is not JSON ({len(body)} bytes)") from None


def _post_json(service: str, url: str, key: str | None, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> Any:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    _, raw = _send(service, "POST", url, json=body, headers={**auth, **(headers or {})}, secrets=(key or "",))
    return _json(raw, service)


def _progress(fraction: float, note: str) -> None:
    ctx = current_job()
    if ctx is not None:
        ctx.progress(fraction, note)


def _text_field(payload: dict, name: str, *, required: bool = True) -> str | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise Permanent(f"payload field {name!r} must be a non-empty string")
    return value


# ---------------------------------------------------------------- the four types
@handler("ai_text_generation", timeout=120)
def ai_text_generation(payload: dict) -> dict:
    """An OpenAI-compatible chat completion (OpenRouter's API shape).

    Payload: ``prompt`` (or ``messages``, the API's list), optional ``model``
    (default ``QKIT_OPENAI_MODEL`` or openai/gpt-4o-mini), ``max_tokens``, ``temperature``.
    """
    base, key = _base_url("QKIT_OPENAI_BASE_URL", DEFAULT_OPENAI_BASE_URL), _key("QKIT_OPENAI_API_KEY")
    messages = payload.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": _text_field(payload, "prompt")}]
    elif not isinstance(messages, list) or not messages:
        raise Permanent("payload field 'messages' must be a non-empty list of chat messages")
    body: dict[str, Any] = {"model": payload.get("model") or _env("QKIT_OPENAI_MODEL", DEFAULT_TEXT_MODEL),
                            "messages": messages}
    for name in ("max_tokens", "temperature", "top_p"):
        if payload.get(name) is not None:
            body[name] = payload[name]
    _progress(0.1, "request sent")
    data = _post_json("the text-generation API", base + "/chat/completions", key, body)
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise BadResponse("the text-generation API answered 2xx without choices[0].message.content") from None
    if not isinstance(text, str):
        raise BadResponse("the text-generation API answered a message whose content is not text")
    _progress(1.0, "completed")
    return {"text": text, "model": data.get("model", body["model"]), "id": data.get("id"),
            "finish_reason": choice.get("finish_reason"), "usage": data.get("usage")}


@handler("ai_image_generation", timeout=300)
def ai_image_generation(payload: dict) -> dict:
    """An OpenAI-compatible image generation.  Payload: ``prompt``, optional ``model``, ``size``.

    The result holds the image's URL; an image returned inline (``b64_json``) is
    not stored (the result cap is 256 KiB): its size and SHA-256 are.
    """
    base = _base_url("QKIT_IMAGES_BASE_URL", DEFAULT_OPENAI_BASE_URL, "QKIT_OPENAI_BASE_URL")
    key = _key("QKIT_IMAGES_API_KEY", "QKIT_OPENAI_API_KEY")
    body = {"model": payload.get("model") or _env("QKIT_IMAGES_MODEL", DEFAULT_IMAGE_MODEL),
            "prompt": _text_field(payload, "prompt"), "n": 1, "size": str(payload.get("size") or "1024x1024")}
    _progress(0.1, "request sent")
    data = _post_json("the image API", base + "/images/generations", key, body)
    try:
        image = data["data"][0]
    except (KeyError, IndexError, TypeError):
        raise BadResponse("the image API answered 2xx without data[0]") from None
    out: dict[str, Any] = {"model": body["model"], "size": body["size"],
                           "revised_prompt": image.get("revised_prompt") if isinstance(image, dict) else None}
    if isinstance(image, dict) and isinstance(image.get("url"), str):
        out["image_url"] = image["url"]
    elif isinstance(image, dict) and isinstance(image.get("b64_json"), str):
        raw = image["b64_json"].encode()
        out.update(image_b64_bytes=len(raw), image_sha256=hashlib.sha256(raw).hexdigest())
    else:
        raise BadResponse("the image API answered 2xx without data[0].url or data[0].b64_json")
    _progress(1.0, "completed")
    return out


class _Page(HTMLParser):
    """The title and the visible text of an HTML page (scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title, self.parts, self._skip, self._in_title = "", [], 0, False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style", "noscript", "template"):
            self._skip += 1
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript", "template") and self._skip:
            self._skip -= 1
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip and data.strip():
            self.parts.append(data.strip())


def _scrape_url(payload: dict) -> str:
    url = _text_field(payload, "url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Permanent("payload field 'url' must be an http(s) URL with a host")
    return url  # type: ignore[return-value]


@handler("web_scraping", timeout=60)
def web_scraping(payload: dict) -> dict:
    """Scrape ``payload["url"]``: through a Firecrawl-style API when ``QKIT_FIRECRAWL_URL`` is set,
    else a direct GET (text pages only, at most ``QKIT_SCRAPE_MAX_BYTES``)."""
    url = _scrape_url(payload)
    if _env("QKIT_FIRECRAWL_URL"):
        base, key = _base_url("QKIT_FIRECRAWL_URL"), _env("QKIT_FIRECRAWL_API_KEY")
        _progress(0.1, "request sent")
        data = _post_json("the scraping API", base + "/v1/scrape", key, {"url": url, "formats": ["markdown"]})
        page = data.get("data") if isinstance(data, dict) else None
        if not isinstance(page, dict) or data.get("success") is False:
            raise BadResponse("the scraping API answered 2xx without a data object")
        meta = page.get("metadata") if isinstance(page.get("metadata"), dict) else {}
        text = str(page.get("markdown") or "")
        _progress(1.0, "completed")
        return {"url": url, "via": "scraping API", "status": meta.get("statusCode"), "title": meta.get("title"),
                "markdown": text[:MAX_PAGE_TEXT], "truncated": len(text) > MAX_PAGE_TEXT}
    cap_raw = _env("QKIT_SCRAPE_MAX_BYTES", str(DEFAULT_SCRAPE_MAX_BYTES))
    if not cap_raw.isdigit() or int(cap_raw) < 1:  # type: ignore[union-attr]
        raise Permanent("QKIT_SCRAPE_MAX_BYTES must be a positive number of bytes")
    _progress(0.1, "fetching")
    response, body = _send("the page's server", "GET", url, stream_cap=int(cap_raw),  # type: ignore[arg-type]
                           headers={"Accept": ", ".join(SCRAPE_TYPES)})
    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in SCRAPE_TYPES:
        raise Permanent(f"the page's server answered content type {clip(ctype or 'none', 80)!r}, "
                        f"not one of {', '.join(SCRAPE_TYPES)}")
    text = body.decode(response.encoding or "utf-8", errors="replace")
    title = None
    if ctype in ("text/html", "application/xhtml+xml"):
        parser = _Page()
        parser.feed(text)
        parser.close()
        title, text = " ".join(parser.title.split()) or None, "\n".join(parser.parts)
    _progress(1.0, "completed")
    return {"url": url, "via": "direct", "status": response.status_code, "content_type": ctype, "bytes": len(body),
            "title": title, "text": text[:MAX_PAGE_TEXT], "truncated": len(text) > MAX_PAGE_TEXT}


@handler("scheduled_publish", timeout=60)
def scheduled_publish(payload: dict) -> dict:
    """POST the post to ``QKIT_PUBLISH_WEBHOOK_URL``: ``{"job_id", "channel", "post"}``.

    ``Idempotency-Key: qkit-<queue>-<job id>`` is the same on every attempt, so a
    receiver can drop a repeat (handlers run at least once).  With
    ``QKIT_PUBLISH_WEBHOOK_SECRET``, ``X-Qkit-Signature: sha256=<hex HMAC of the body>``.
    """
    url = _base_url("QKIT_PUBLISH_WEBHOOK_URL")
    ctx = current_job()
    job_id, queue = (ctx.id, ctx.queue) if ctx else (0, "default")
    post = {k: v for k, v in payload.items() if k not in ("channel", "simulate")}
    if not post:
        raise Permanent("payload has nothing to publish (only 'channel')")
    body = json.dumps({"job_id": job_id, "channel": str(payload.get("channel", "blog")), "post": post},
                      separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": f"qkit-{queue}-{job_id}"}
    secret = _env("QKIT_PUBLISH_WEBHOOK_SECRET")
    if secret:
        headers["X-Qkit-Signature"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    _progress(0.1, "request sent")
    response, raw = _send("the publishing webhook", "POST", url, content=body, headers=headers,
                         secrets=(secret or "",))
    answer: Any = None
    if raw:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None  # a webhook may answer plain text: the status says it took the post
    _progress(1.0, "published")
    post_id = answer.get("id") or answer.get("post_id") if isinstance(answer, dict) else None
    return {"channel": str(payload.get("channel", "blog")), "status": response.status_code,
            "post_id": None if post_id is None else str(post_id)[:200]}

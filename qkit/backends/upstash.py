"""Upstash Redis over HTTP, through the official ``upstash-redis`` client.

Every call is one HTTPS request, and Upstash bills every command, so the
backend counts both (an EVALSHA that answers NOSCRIPT and its EVAL fallback
are two commands and two requests).

What the client does not do for us (docs/architecture.md#the-upstash-backend-and-its-local-endpoint):

* it has no timeout at all: we set one on its httpx client;
* its retries re-send writes: we build it with ``rest_retries=0``, and a
  transport failure reaches the caller as :class:`~qkit.errors.BackendUnavailable`
  (the write may or may not have been applied; qkit's scripts let callers recover);
* a rejected pipeline surfaces as ``AttributeError`` and a 401 or a proxy
  error page as a bare ``UpstashError``/``JSONDecodeError``: an httpx response
  hook classifies HTTP answers before the client looks at them;
* its replies are formatted by command name; pipeline replies are instead
  shaped exactly as redis-py (``decode_responses=True, protocol=2``) shapes
  them, so callers cannot tell the backends apart.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import httpx
import redis
import upstash_redis
from upstash_redis.errors import UpstashError

from qkit.backends.base import Backend
from qkit.backends.redis import client_options
from qkit.config import url_for_messages
from qkit.errors import BackendUnavailable, ConfigError, QkitError
from qkit.lua import Script, with_key_locking
from qkit.text import clip

__all__ = ["UpstashBackend", "UpstashUnauthorized"]

URL_VAR = "UPSTASH_REDIS_REST_URL"
TOKEN_VAR = "UPSTASH_REDIS_REST_TOKEN"

T = TypeVar("T")


class UpstashUnauthorized(BackendUnavailable):
    """Upstash answered 401: the token is wrong, expired or missing."""


class _ReplyError(QkitError):
    """Redis (or Upstash) answered with an error reply; the message is its full text."""


class _HttpFailure(Exception):
    """An HTTP answer the client would misread, caught in the response hook."""

    def __init__(self, status: int, path: str, error: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.path = path
        self.error = error  # the JSON {"error": ...} text, if the body had one


def _json_error(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else None


def _check_response(response: httpx.Response) -> None:
    """httpx response hook: classify non-200 answers before the client parses them.

    Raising here propagates out of ``client.post``; with ``rest_retries=0`` the
    upstash client re-raises it unchanged.
    """
    status = response.status_code
    if status == 401:
        raise _HttpFailure(status, response.request.url.path, None)
    if status in (200, 400) and not response.request.url.path.endswith(("/pipeline", "/multi-exec")):
        return  # the client handles these: {"result"} or {"error"} for one command
    if status == 200:
        return
    # Everything else would be mis-parsed: a top-level {"error"} for a
    # pipeline turns into AttributeError, an HTML error page into
    # JSONDecodeError, and a JSON 404/5xx into a harmless-looking UpstashError.
    response.read()
    raise _HttpFailure(status, response.request.url.path, _json_error(response))


def _arg(value: Any) -> str:
    """Stringify an argument the way redis-py encodes it (P6: never let the
    upstash client pick JSON numbers, ``"null"`` or ``true``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")  # the REST protocol is text-only
    if isinstance(value, bool) or value is None:
        raise TypeError(f"cannot send {value!r} to Redis: pass a string")
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"cannot send a {type(value).__name__} to Redis: pass a string")


_REDIS_PY_CALLBACKS: Any = None


def _redis_py_callbacks() -> Any:
    """redis-py's reply callbacks for ``decode_responses=True, protocol=2``.

    The redis backend runs pipelines through redis-py, which reshapes some
    replies (HGETALL → dict, ZSCORE → float, SET → True…).  Applying the same
    table to our raw replies gives identical results.  Building a client does
    not connect.
    """
    global _REDIS_PY_CALLBACKS
    if _REDIS_PY_CALLBACKS is None:
        _REDIS_PY_CALLBACKS = redis.Redis(**client_options()).response_callbacks  # the redis backend's settings
    return _REDIS_PY_CALLBACKS


def uses_key_locking(hostname: str, setting: str) -> bool:
    """Whether scripts carry ``allow-key-locking``: ``on``/``off``, or ``auto`` = the host is ``*.upstash.io``."""
    if setting in ("on", "off"):
        return setting == "on"
    host = hostname.lower().rstrip(".")
    return host == "upstash.io" or host.endswith(".upstash.io")


class UpstashBackend(Backend):
    """Scripts and pipelines over Upstash's REST API."""

    kind = "upstash"

    def __init__(self, url: str, token: str, timeout: float = 10.0, *, key_locking: str = "auto") -> None:
        """Connect lazily to ``url`` with ``token``; ``timeout`` bounds each HTTP request (s).

        ``key_locking`` (``QKIT_UPSTASH_KEY_LOCKING``): ``on`` sends every script with Upstash's
        ``allow-key-locking`` shebang, so it locks only its queue's keys instead of the whole database;
        ``off`` never; ``auto`` only when the host is Upstash's own (``*.upstash.io``), because stock
        Redis 7 behind another endpoint refuses the flag (docs/upstash.md).
        """
        super().__init__()
        url = (url or "").strip().rstrip("/")  # a trailing slash breaks pipelines (P10)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{URL_VAR} must be an http(s) URL such as https://<db>.upstash.io")
        if parts.query or parts.fragment:
            # The client appends /pipeline to the URL text; and a ?_token=
            # would leak the token into logs.  Never echo the URL here.
            raise ConfigError(f"{URL_VAR} must not have a query string or fragment")
        if not token:
            raise ConfigError(f"{TOKEN_VAR} is empty")
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            # httpx could not put it in a header; never echo the token itself.
            raise ConfigError(f"{TOKEN_VAR} must be printable ASCII without spaces")
        if timeout <= 0:
            raise ConfigError("the Upstash request timeout must be positive")
        self._url = url
        self.key_locking = uses_key_locking(parts.hostname, key_locking)
        self._token = token
        self._timeout = float(timeout)
        self._redis = upstash_redis.Redis(url, token, rest_retries=0, allow_telemetry=False)
        # upstash-redis 1.8 builds httpx.Client(timeout=None) and offers no
        # option; its private ``_http._client`` is the only handle.
        client = getattr(getattr(self._redis, "_http", None), "_client", None)
        if not isinstance(client, httpx.Client):
            raise RuntimeError("this upstash-redis version has no _http._client; qkit needs 1.8.x")
        client.timeout = httpx.Timeout(self._timeout)
        # The client adds this header on its first call by mutating a dict
        # shared by every thread's requests; adding it now leaves only value
        # updates for later, which cannot break a concurrent iteration.
        self._redis._headers.setdefault("Upstash-Sync-Token", "")
        hooks = client.event_hooks
        hooks["response"] = [*hooks.get("response", []), _check_response]
        client.event_hooks = hooks

    # ------------------------------------------------------------------ plumbing
    def describe(self) -> str:
        """The REST URL without user info or query string (never the token)."""
        return url_for_messages(self._url)

    def _scrub(self, text: str) -> str:
        # Belt and braces: no message may ever carry the token.
        return clip(text.replace(self._token, "<token>"), 300, one_line=True)

    def _call(self, send: Callable[[], T], commands: int) -> T:
        """Make one HTTP request through the client; map its failures to qkit's errors."""
        # Counted before sending: a request that fails in transit may still
        # have reached Upstash and been billed.
        self._count(commands, 1)
        where = url_for_messages(self._url)
        try:
            return send()
        except _HttpFailure as failure:
            if failure.status == 401:
                raise UpstashUnauthorized(
                    f"Upstash at {where} rejected the token (HTTP 401); check {TOKEN_VAR}"
                ) from None
            if failure.status == 400 and failure.error:
                # A discarded transaction or an oversized body: Redis/Upstash said no.
                raise _ReplyError(self._scrub(failure.error)) from None
            detail = f": {self._scrub(failure.error)}" if failure.error else ""
            raise BackendUnavailable(
                f"Upstash at {where} answered HTTP {failure.status}{detail}; check {URL_VAR}"
            ) from None
        except httpx.TimeoutException:
            raise BackendUnavailable(
                f"Upstash at {where} did not answer within {self._timeout:g} s "
                f"(the request may have been applied); check {URL_VAR}"
            ) from None
        except httpx.HTTPError as err:  # connect/read/protocol errors, bad URL
            raise BackendUnavailable(
                f"cannot reach Upstash at {where} ({type(err).__name__}: {self._scrub(str(err))}); "
                f"check {URL_VAR}"
            ) from None
        except json.JSONDecodeError:
            raise BackendUnavailable(
                f"Upstash at {where} answered with a body that is not JSON; check {URL_VAR}"
            ) from None
        except (KeyError, AttributeError):
            # A 200 JSON body without "result" (KeyError) or a pipeline answer
            # that is not a list (AttributeError): not an Upstash endpoint.
            raise BackendUnavailable(
                f"{where} does not answer like Upstash's REST API; check {URL_VAR}"
            ) from None
        except UpstashError as err:  # a Redis error reply: script error, WRONGTYPE, NOSCRIPT…
            raise _ReplyError(self._scrub(str(err))) from None
        except UnicodeDecodeError:
            raise QkitError("Redis returned a value that is not UTF-8 text") from None

    # ------------------------------------------------------------------ interface
    def run_script(
        self, script: Script, keys: list[str], args: list[str], *, idempotent: bool = False
    ) -> Any:
        """EVALSHA the script, then EVAL it if Upstash answers NOSCRIPT.

        With ``idempotent=True`` (only for scripts that give the same answer
        when replayed) a transport failure is retried once; otherwise it is
        raised, because the write may or may not have been applied.
        """
        keys = [_arg(k) for k in keys]
        args = [_arg(a) for a in args]
        if self.key_locking:
            script = with_key_locking(script)
        try:
            return self._run_script_once(script, keys, args)
        except UpstashUnauthorized:
            raise
        except BackendUnavailable:
            if not idempotent:
                raise
        return self._run_script_once(script, keys, args)

    def _run_script_once(self, script: Script, keys: list[str], args: list[str]) -> Any:
        try:
            try:
                return self._call(lambda: self._redis.evalsha(script.sha, keys, args), commands=1)
            except _ReplyError as err:
                # Not cached yet, or Upstash routed EVALSHA to a replica that
                # lacks the script (P12): send the source.
                if "NOSCRIPT" not in str(err):
                    raise
            return self._call(lambda: self._redis.eval(script.source, keys, args), commands=1)
        except _ReplyError as err:
            # Same wording as the redis backend, with Redis's full error text.
            raise QkitError(f"Redis refused script {script.name}: {err}") from None

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send read-only commands in one ``/pipeline`` request; replies shaped as redis-py's.

        The first failing command raises :class:`~qkit.errors.QkitError` (the
        client drops the other replies, P1), which is why pipelines are for
        reads only.
        """
        batch = [[_arg(part) for part in command] for command in commands]
        if not batch:
            return []
        if any(not command for command in batch):
            raise ValueError("empty command in pipeline")

        def send() -> list[Any]:
            pipe = self._redis.pipeline()
            for name, *rest in batch:
                # A lowercase name escapes the client's formatting by command
                # name (it only knows uppercase names): we get raw replies and
                # shape them like redis-py below.  Redis ignores the case.
                pipe.execute([name.lower(), *rest])
            return pipe.exec()

        replies = self._call(send, commands=len(batch))
        callbacks = _redis_py_callbacks()
        shaped = []
        for (name, *_), reply in zip(batch, replies):
            callback = callbacks.get(name)
            shaped.append(callback(reply) if callback is not None else reply)
        return shaped

    def ping(self) -> bool:
        """True when Upstash answers PING; raises BackendUnavailable otherwise."""
        return self._call(lambda: self._redis.ping(), commands=1) == "PONG"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._redis.close()

"""Credentials: bearer tokens (parsed and compared in constant time), ``WORKER_SECRET`` and QStash signatures.

Secrets are read from the environment at request time, never cached; a secret
that is unset or blank disables its routes (503).  Tokens are compared as raw
bytes in constant time; see the package docstring for the rules.  Which token
is which role is :mod:`qkit.api.roles`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Sequence

import jwt
from starlette.requests import Request
from starlette.types import Scope

from qkit.api.bodies import MAX_WORKER_BODY_BYTES, read_body
from qkit.api.errors import ApiError

QSTASH_CLOCK_TOLERANCE = 10


def _secret(name: str) -> bytes | None:
    """A secret from the environment (read now), stripped; None when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value.encode("utf-8") if value else None


def qstash_keys() -> list[str]:
    """The QStash signing keys set now: current, then next (how QStash rotates them)."""
    return [k for k in (os.environ.get("QSTASH_CURRENT_SIGNING_KEY", "").strip(),
                        os.environ.get("QSTASH_NEXT_SIGNING_KEY", "").strip()) if k]


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's single ``Authorization: Bearer`` header, as raw bytes.

    None when there is no such header, more than one, another scheme, or no token.
    """
    values = [value for name, value in scope.get("headers", []) if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    parts = values[0].strip(b" \t").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    return parts[1].strip(b" \t") or None


def token_matches(presented: bytes | None, expected: bytes) -> bool:
    """Constant-time comparison of raw bytes (via SHA-256, so lengths do not leak)."""
    given = hashlib.sha256(presented if presented is not None else b"").digest()
    same = hmac.compare_digest(given, hashlib.sha256(expected).digest())
    return presented is not None and same


def verify_qstash_signature(signature: str, body: bytes, url: str, keys: Sequence[str], *,
                            leeway: float = QSTASH_CLOCK_TOLERANCE) -> bool:
    """True when ``signature`` is a QStash JWT for this ``url`` and these exact body bytes.

    Each key is tried in order (current, then next: that is how QStash rotates
    keys).  Requires ``iss == "Upstash"``, ``sub``, ``exp``, ``nbf`` and ``body``.
    """
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=")
    for key in keys:
        try:
            claims = jwt.decode(signature, key, algorithms=["HS256"], issuer="Upstash", leeway=leeway,
                                options={"require": ["iss", "sub", "exp", "nbf", "body"]})
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        sub, claimed = claims.get("sub"), claims.get("body")
        if not isinstance(sub, str) or not isinstance(claimed, str):
            continue
        if sub.rstrip("/") != url.rstrip("/"):
            continue
        if hmac.compare_digest(claimed.rstrip("=").encode("utf-8"), digest):
            return True
    return False


def endpoint_url(request: Request) -> str:
    """The URL QStash was told to call: ``QKIT_API_PUBLIC_URL`` + path, or the request's own URL."""
    base = os.environ.get("QKIT_API_PUBLIC_URL", "").strip().rstrip("/")
    url = base + request.url.path if base else f"{request.url.scheme}://{request.url.netloc}{request.url.path}"
    return f"{url}?{request.url.query}" if request.url.query else url


async def authorize_burst(request: Request) -> tuple[str, bytes]:
    """``/api/workers``: ``Bearer $WORKER_SECRET`` or a QStash signature; returns (via, raw body).

    503 when neither is configured, 401 when neither matches.  The body is read
    (within its cap) before a signature is checked, since the signature covers it.
    """
    secret = _secret("WORKER_SECRET")
    keys = qstash_keys()
    if secret is None and not keys:
        raise ApiError(503, "WORKER_SECRET is not set on the server (nor QStash signing keys): "
                            "/api/workers is disabled")
    raw: bytes | None = None
    via = None
    if secret is not None and token_matches(bearer_token(request.scope), secret):
        via = "bearer"
    elif keys and "upstash-signature" in request.headers:
        raw = await read_body(request, MAX_WORKER_BODY_BYTES)
        if verify_qstash_signature(request.headers["upstash-signature"], raw, endpoint_url(request), keys):
            via = "qstash"
    if via is None:
        raise ApiError(401, "missing or invalid credentials", headers={"WWW-Authenticate": 'Bearer realm="qkit"'})
    if raw is None:
        raw = await read_body(request, MAX_WORKER_BODY_BYTES)
    return via, raw


def unset_secrets() -> list[tuple[str, str]]:
    """(variable, routes) for each secret whose routes answer 503 now (warned at ``qkit serve``)."""
    out = []
    if not any(_secret(name) for name in ("QKIT_API_TOKEN", "QKIT_API_READ_TOKEN", "QKIT_API_JWKS_URL")):
        out.append(("QKIT_API_TOKEN", "/api/jobs*, /api/queues, /api/stats, /api/runs, /metrics"))
    if _secret("WORKER_SECRET") is None and not qstash_keys():
        out.append(("WORKER_SECRET", "/api/workers"))
    return out

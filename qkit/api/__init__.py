"""The HTTP API (docs/http-api.md), served by ``qkit serve``: closed by default.

Needs the ``api`` extra (``pip install 'qkit[api]'``).  The package's modules:

=====================  =================================================================
:mod:`qkit.api.app`    the core routes, :data:`ROUTE_MODULES` and :func:`create_app` (assembly)
:mod:`qkit.api.auth`   bearer tokens and QStash signatures
:mod:`qkit.api.roles`  who calls (:class:`Caller`) and each route's rule (:func:`authorize`)
:mod:`qkit.api.holder` the served queue, and views of the ledger's other queues
:mod:`qkit.api.routes_jobs` ``/api/jobs*`` (enqueue, list, one job, cancel)
:mod:`qkit.api.routes_ops` ``/api/queues``, ``/api/stats``, ``/api/runs``
:mod:`qkit.api.routes_dlq` ``/api/dlq`` (list, groups), ``/api/dlq/replay``, ``/api/dlq/purge``
:mod:`qkit.api.metrics` ``GET /metrics`` (Prometheus, read from the ledger at scrape time)
:mod:`qkit.api.bodies` bodies read under caps, strict JSON, field and query checks, burst caps
:mod:`qkit.api.errors` :class:`ApiError`, the endpoint guard, JSON 404/405, route templates
:mod:`qkit.api.openapi` the OpenAPI document (core paths; each route module adds its own)
:mod:`qkit.api.serve`  ``qkit serve`` (uvicorn, redacting logs)
``dashboard*``         the HTML dashboard at ``GET /`` (pages, actions, sign-in, views)
=====================  =================================================================

The routes and who may call them are listed in docs/http-api.md; the roles
(``QKIT_API_TOKEN`` admin, ``QKIT_API_READ_TOKEN`` reader, a JWT user verified
against ``QKIT_API_JWKS_URL``, ``QKIT_METRICS_TOKEN``) are :mod:`qkit.api.roles`.

The dashboard (``GET /`` and its pages, docs/http-api.md#dashboard) signs in with
``QKIT_API_TOKEN`` (admin) or ``QKIT_API_READ_TOKEN`` (read-only) into a signed
session cookie; its actions are CSRF-checked POSTs (:mod:`qkit.api.dashboard_auth`).

Security decisions (each one is deliberate and tested in ``tests/test_api.py``):

* **Fail closed.**  A secret that is unset, empty or only whitespace disables
  its routes: they answer 503 whatever the request carries.  ``/api/workers``
  is enabled by ``WORKER_SECRET`` or by QStash signing keys.
* **When secrets are read.**  ``QKIT_API_TOKEN``, ``QKIT_API_READ_TOKEN``,
  ``QKIT_METRICS_TOKEN``, ``QKIT_API_JWKS_URL`` (and its issuer/audience), ``WORKER_SECRET``,
  ``QSTASH_CURRENT_SIGNING_KEY``, ``QSTASH_NEXT_SIGNING_KEY`` and
  ``QKIT_API_PUBLIC_URL`` are read from the environment *at request time*
  (never cached in the app); the limits ``QKIT_API_MAX_SECONDS`` and
  ``QKIT_API_MAX_JOBS`` are read *once, at app creation*, so a malformed value
  stops ``qkit serve`` at start with one line naming the variable.
* **Bearer parsing** (RFC 6750 / RFC 7235): exactly one ``Authorization``
  header; the scheme ``Bearer`` is matched case-insensitively (``bearer`` works);
  one or more spaces may separate it from the token, and spaces around the
  token are ignored (HTTP strips them anyway).  The configured secret is
  stripped the same way.  Tokens are compared as raw header **bytes** with
  :func:`hmac.compare_digest` over their SHA-256 digests (constant time, no
  length leak), so a non-ASCII token is a plain mismatch: 401, never 500.
  Tokens are never accepted in the query string, and the two secrets are not
  interchangeable.
* **QStash**: ``Upstash-Signature`` is a HS256 JWT; issuer ``Upstash``; ``sub``
  must equal this endpoint's URL (``QKIT_API_PUBLIC_URL`` + path when set,
  e.g. behind a proxy, else the URL the request arrived on); ``exp``/``nbf``
  with a 10 s clock tolerance; claim ``body`` = base64url(SHA-256(raw body)).
  Tried with the current key, then the next one.  ``jti`` is not cached: a
  burst is safe to replay.
* **Limits**: request bodies are read with a cap (300 KiB for jobs, 16 KiB for
  workers): a declared ``Content-Length`` over the cap is refused (413) before
  reading, and a chunked body is counted while it streams and refused as soon
  as it passes the cap.  A payload over 256 KiB of compact JSON is a 413 too.
  JSON nesting is capped at 64 levels.  A burst's ``max_seconds`` and
  ``max_jobs`` are clamped to the server's caps.
* **Logs**: uvicorn's access log is off; :class:`qkit.accesslog.AccessLog` writes method,
  route template, status and time, never headers, query strings or bodies.
  Every log record passes through :func:`qkit.config.redact`.  Error
  responses never carry URLs, versions or configuration.
"""
from __future__ import annotations

from qkit.extras import require

require("the HTTP API (qkit serve)", "starlette", "uvicorn", "jwt", "jinja2", "itsdangerous")

from qkit.api.app import OPENAPI, ROUTE_MODULES, create_app  # noqa: E402
from qkit.api.auth import _secret, bearer_token, endpoint_url, token_matches, verify_qstash_signature  # noqa: E402
from qkit.api.bodies import (MAX_BODY_BYTES, MAX_WORKER_BODY_BYTES, ApiLimits, api_limits, parse_object,  # noqa: E402
                             read_body)
from qkit.api.errors import UNAVAILABLE, ApiError  # noqa: E402
from qkit.api.holder import QueueHolder  # noqa: E402
from qkit.api.roles import Caller, authorize, identify, identify_token  # noqa: E402
from qkit.api.routes_jobs import LIST_ERROR_CHARS, list_rows  # noqa: E402
from qkit.api.serve import RedactFilter, serve  # noqa: E402

__all__ = [
    "create_app", "serve", "ApiError", "ApiLimits", "api_limits", "QueueHolder", "list_rows", "OPENAPI",
    "RedactFilter", "bearer_token", "token_matches", "verify_qstash_signature", "endpoint_url",
    "ROUTE_MODULES", "Caller", "authorize", "identify", "identify_token", "read_body", "parse_object", "MAX_BODY_BYTES", "MAX_WORKER_BODY_BYTES",
    "LIST_ERROR_CHARS", "UNAVAILABLE", "_secret",
]

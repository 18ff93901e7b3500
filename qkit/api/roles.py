"""Who is calling, and what they may do: the roles of the API and the dashboard (docs/http-api.md#roles).

========== ===================================== ===============================================
role       credential                            may
========== ===================================== ===============================================
``admin``  ``Bearer $QKIT_API_TOKEN``            everything
``reader`` ``Bearer $QKIT_API_READ_TOKEN``       read everything (a write is a 403)
``user``   a bearer JWT verified against          create jobs, and list, read and cancel their own
           ``QKIT_API_JWKS_URL`` (its ``sub``)    (another user's job is a 404, as if absent)
``metrics`` ``Bearer $QKIT_METRICS_TOKEN``        ``GET /metrics`` only
``nobody`` anything else                          nothing (401)
========== ===================================== ===============================================

:func:`identify` decides who a token is (:class:`Caller`); :func:`authorize`
applies a route's rule to that decision and raises the one-line 401/403/503.
The dashboard reuses both.  Secrets and the JWKS settings are read from the
environment at each request, like every other secret of the API.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import jwt
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from qkit.api.auth import _secret, bearer_token, token_matches
from qkit.api.bodies import check_query, name_param
from qkit.api.errors import ApiError

log = logging.getLogger("qkit.api")

ADMIN, READER, USER, METRICS, NOBODY = "admin", "reader", "user", "metrics", "nobody"
#: the variable that enables each role
ROLE_VARIABLES = {ADMIN: "QKIT_API_TOKEN", READER: "QKIT_API_READ_TOKEN", USER: "QKIT_API_JWKS_URL",
                  METRICS: "QKIT_METRICS_TOKEN"}
#: the JWT algorithms accepted for users (asymmetric only: the server holds no signing secret)
JWT_ALGORITHMS = ["RS256", "ES256"]
JWT_LEEWAY_S = 10
#: ``jobs.owner`` holds at most this many characters
MAX_SUB_CHARS = 256


@dataclass(frozen=True)
class Caller:
    """The auth decision for one request: ``role`` (admin, reader, user, metrics, nobody) and a user's ``sub``."""

    role: str
    sub: str | None = None

    @property
    def can_write(self) -> bool:
        return self.role in (ADMIN, USER)

    @property
    def owner(self) -> str | None:
        """The owner the caller's job lists are narrowed to (None: every job)."""
        return self.sub if self.role == USER else None

    def sees(self, owner: str | None) -> bool:
        """May this caller see a job whose ``owner`` is this?"""
        return self.role in (ADMIN, READER) or (self.role == USER and owner == self.sub)


NOBODY_CALLER = Caller(NOBODY)


def enabled(role: str) -> bool:
    """Is the role's variable set (not blank) now?"""
    return bool(os.environ.get(ROLE_VARIABLES[role], "").strip())


# --------------------------------------------------------------------------- JWT users
_clients: dict[str, jwt.PyJWKClient] = {}
_clients_lock = threading.Lock()


def _jwks_client(url: str) -> jwt.PyJWKClient:
    """One JWKS client per URL (it caches the key set for 5 minutes and refetches for an unknown ``kid``)."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)
        return client


def verify_user_token(token: str, jwks_url: str, *, issuer: str | None = None,
                      audience: str | None = None) -> str:
    """The ``sub`` of a JWT signed (RS256/ES256) by a key of the JWKS at ``jwks_url``.

    ``exp`` and ``sub`` are required; ``iss`` and ``aud`` are required and
    checked when ``issuer`` / ``audience`` are given.  Raises ApiError: 401 for
    a token that does not verify, 503 when the JWKS cannot be fetched.
    """
    required = ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else [])
    try:
        key = _jwks_client(jwks_url).get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=JWT_ALGORITHMS, issuer=issuer or None,
                            audience=audience or None, leeway=JWT_LEEWAY_S,
                            options={"require": required, "verify_aud": bool(audience)})
    except jwt.PyJWKClientConnectionError as exc:
        log.error("the JWKS of QKIT_API_JWKS_URL cannot be fetched: %s", exc)  # qkit serve's logs redact
        raise ApiError(503, "the JWKS of QKIT_API_JWKS_URL cannot be fetched (details are in the server log)") \
            from None
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        raise unauthorized() from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_CHARS or "\x00" in sub:
        raise unauthorized()
    return sub


def _looks_like_jwt(raw: bytes) -> bool:
    """Three dot-separated ASCII parts: worth verifying (a plain mismatch otherwise)."""
    return raw.isascii() and len(raw.split(b".")) == 3


# --------------------------------------------------------------------------- the decision
def _static_caller(token: bytes) -> Caller | None:
    """The role whose static token this is (admin, reader, metrics, compared in constant time), or None."""
    for role in (ADMIN, READER, METRICS):
        expected = _secret(ROLE_VARIABLES[role])
        if expected is not None and token_matches(token, expected):
            return Caller(role)
    return None


def _jwt_caller(token: bytes) -> Caller:
    """A user when ``token`` is a JWT the configured JWKS verifies; NOBODY when no JWKS is set or it is no JWT."""
    jwks_url = os.environ.get(ROLE_VARIABLES[USER], "").strip()
    if not (jwks_url and _looks_like_jwt(token)):
        return NOBODY_CALLER
    sub = verify_user_token(token.decode("ascii"), jwks_url,
                            issuer=os.environ.get("QKIT_API_JWT_ISSUER", "").strip() or None,
                            audience=os.environ.get("QKIT_API_JWT_AUDIENCE", "").strip() or None)
    return Caller(USER, sub)


def identify_token(token: bytes | None) -> Caller:
    """Who presents ``token`` (raw bytes of a bearer): static tokens first, then a JWT user.

    Blocking (a JWT may need the JWKS fetched): call it off the event loop, or use :func:`identify`.
    Raises ApiError 401 for a JWT that does not verify, 503 when the JWKS cannot be fetched.
    """
    if token is None:
        return NOBODY_CALLER
    return _static_caller(token) or _jwt_caller(token)


async def identify(request: Request) -> Caller:
    """The :class:`Caller` of a request's ``Authorization: Bearer`` header (NOBODY without one).

    Static tokens are decided on the event loop; only a JWT goes to a thread (its JWKS may need fetching).
    """
    token = bearer_token(request.scope)
    if token is None:
        return NOBODY_CALLER
    return _static_caller(token) or await run_in_threadpool(_jwt_caller, token)


def unauthorized() -> ApiError:
    return ApiError(401, "missing or invalid credentials", headers={"WWW-Authenticate": 'Bearer realm="qkit"'})


def route_roles(*, operator: bool = False, metrics: bool = False) -> list[str]:
    """The roles a route takes: ``operator`` routes (queues, stats, runs, DLQ) are not for users;
    ``metrics`` routes also take ``QKIT_METRICS_TOKEN``."""
    return [ADMIN, READER] + ([] if operator else [USER]) + ([METRICS] if metrics else [])


def require_enabled(roles: list[str]) -> None:
    """503 when none of ``roles`` is enabled: the route is closed."""
    if not any(enabled(r) for r in roles):
        first, *rest = (ROLE_VARIABLES[r] for r in roles)
        raise ApiError(503, f"{first} is not set on the server (nor {', '.join(rest)}): this route is disabled")


def check(caller: Caller, *, write: bool = False, operator: bool = False, metrics: bool = False) -> Caller:
    """Apply a route's rule to a caller: 503 when none of its roles is enabled, 401 for nobody, 403 for a role
    the route does not take, or for a reader's write (``write``: a change, for admins and users only)."""
    roles = route_roles(operator=operator, metrics=metrics)
    require_enabled(roles)
    if caller.role == NOBODY:
        raise unauthorized()
    if caller.role not in roles:
        raise ApiError(403, "a signed-in user reaches only their own jobs (/api/jobs*)" if caller.role == USER
                       else "QKIT_METRICS_TOKEN opens GET /metrics only")
    if write and not caller.can_write:
        raise ApiError(403, "QKIT_API_READ_TOKEN can only read: this request needs QKIT_API_TOKEN")
    return caller


async def authorize(request: Request, *, write: bool = False, operator: bool = False,
                    metrics: bool = False) -> Caller:
    """The caller of ``request`` if the route's rule (see :func:`check`) lets them through.

    A closed route answers 503 before any credential is looked at (no JWKS fetch).
    """
    require_enabled(route_roles(operator=operator, metrics=metrics))
    return check(await identify(request), write=write, operator=operator, metrics=metrics)


async def operator_query(request: Request, allowed: tuple[str, ...]) -> tuple[Any, str | None]:
    """An operator route's preamble: the caller may read operator data, the query names only ``allowed``;
    returns the query and its ``queue`` (None when absent)."""
    await authorize(request, operator=True)
    params = request.query_params
    check_query(params, allowed)
    return params, name_param(params, "queue") if "queue" in allowed else None

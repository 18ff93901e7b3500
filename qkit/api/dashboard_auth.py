"""Who is using the dashboard: the login form, the signed session cookie, roles and CSRF (docs/http-api.md#dashboard).

* **Login.**  ``POST /login`` takes a token in a form and asks the API who it is
  (:func:`qkit.api.roles.identify_token`): ``QKIT_API_TOKEN`` (admin: reads and actions),
  ``QKIT_API_READ_TOKEN`` (reader: reads only), or, with ``QKIT_API_JWKS_URL``, a user's JWT (that user's
  own jobs; they may cancel them).  The token is never kept: the session holds the role, the user, a
  per-session CSRF token and an HMAC of the token under the server's key, so a rotated token ends the
  sessions made with the old one.
* **The cookie** ``qkit_session`` is signed with itsdangerous under a random key kept in
  ``$QKIT_HOME/dashboard.key`` (0600, made on first use), lives at most :data:`SESSION_SECONDS`, and is
  ``HttpOnly; SameSite=Strict`` (``Secure`` over HTTPS).
* **Actions** are POSTs that need an admin session (a user's cancel of their own job too), the session's
  CSRF token in the form field ``csrf`` or the ``X-CSRF-Token`` header, and, when the browser sends an
  ``Origin``, this server's origin: otherwise 403.  No session: 401.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from qkit.api import roles
from qkit.api.auth import _secret
from qkit.api.bodies import read_body
from qkit.api.errors import ApiError

COOKIE = "qkit_session"
#: a session lasts at most this long (a JWT's own expiry ends it sooner)
SESSION_SECONDS = 12 * 3600
KEY_FILE = "dashboard.key"
#: forms are small: a token, a CSRF token, a few ids
MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class Viewer:
    """The signed-in person: ``role`` admin, reader or user; ``owner`` (a user's ``sub``) narrows what they see."""

    role: str
    owner: str | None
    csrf: str

    @property
    def can_act(self) -> bool:
        """Replay, purge and cancel any job."""
        return self.role == "admin"

    def can_cancel(self, job_owner: str | None) -> bool:
        return self.can_act or (self.role == "user" and self.owner is not None and job_owner == self.owner)


# ---------------------------------------------------------------- the server's key
def session_key(home: Path) -> bytes:
    """The random signing key in ``home/dashboard.key`` (0600), created once; several servers share it."""
    path = Path(home) / KEY_FILE
    for _ in range(50):
        try:
            key = path.read_bytes().strip()
            if len(key) >= 32:
                return key
        except FileNotFoundError:
            pass
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic and never over another server's key: the first one wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        time.sleep(0.01)
    raise RuntimeError(f"cannot read the dashboard's key {path}")


def _serializer(request: Request) -> URLSafeTimedSerializer:
    state = request.app.state
    if getattr(state, "dashboard_signer", None) is None:
        state.dashboard_signer = URLSafeTimedSerializer(session_key(state.queue.settings.home),
                                                        salt="qkit-dashboard-session")
    return state.dashboard_signer


def _token_mac(request: Request, token: bytes) -> str:
    key = _serializer(request).secret_keys[-1]
    return hmac.new(key, b"qkit-dashboard-token:" + token, hashlib.sha256).hexdigest()[:32]


# ---------------------------------------------------------------- signing in
def _jwt_expiry(token: bytes) -> float:
    """The ``exp`` of a JWT :func:`qkit.api.roles.identify_token` has verified (it requires one)."""
    return float(jwt.decode(token.decode("ascii"), options={"verify_signature": False})["exp"])


def session_for(request: Request, token: bytes) -> dict[str, Any] | None:
    """The session a token opens (the API's own decision, :func:`qkit.api.roles.identify_token`), or None.

    Admin and reader sessions keep an HMAC of the token (checked again at each request); a user's
    keeps their ``sub`` and ends when their JWT expires.  The metrics token opens no session.
    Blocking (a JWT may need the JWKS fetched); raises ApiError 503 when the JWKS cannot be fetched.
    """
    try:
        caller = roles.identify_token(token)
    except ApiError as exc:
        if exc.status == 401:
            return None
        raise
    csrf = secrets.token_urlsafe(24)
    if caller.role in (roles.ADMIN, roles.READER):
        expected = _secret(roles.ROLE_VARIABLES[caller.role])
        return {"r": caller.role, "m": _token_mac(request, expected or b""), "c": csrf}
    if caller.role == roles.USER:
        return {"r": caller.role, "o": caller.sub, "x": _jwt_expiry(token), "c": csrf}
    return None


def sign_in_possible() -> bool:
    """Whether any token could sign in now (else the login page says what to set)."""
    return any(roles.enabled(r) for r in (roles.ADMIN, roles.READER, roles.USER))


def set_session(request: Request, response: Response, data: dict[str, Any] | None) -> None:
    """Write (or with None, clear) the session cookie on ``response``."""
    secure = request.url.scheme == "https"
    if data is None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure)
        return
    response.set_cookie(COOKIE, _serializer(request).dumps(data), max_age=SESSION_SECONDS, path="/",
                        httponly=True, samesite="strict", secure=secure)


def viewer(request: Request) -> Viewer | None:
    """The session's viewer, or None: no cookie, a bad or old signature, a rotated token, an expired JWT."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        data = _serializer(request).loads(raw, max_age=SESSION_SECONDS)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("c"), str):
        return None
    role = data.get("r")
    if role in (roles.ADMIN, roles.READER):
        expected = _secret(roles.ROLE_VARIABLES[role])
        if expected is None or not hmac.compare_digest(str(data.get("m", "")), _token_mac(request, expected)):
            return None
        return Viewer(role, None, data["c"])
    if role == roles.USER and roles.enabled(roles.USER) and isinstance(data.get("o"), str) \
            and float(data.get("x") or 0) > time.time():
        return Viewer(role, data["o"], data["c"])
    return None


# ---------------------------------------------------------------- forms and actions
async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form (capped; no body is an empty form); 415 for another content type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, MAX_FORM_BYTES)
    if kind != "application/x-www-form-urlencoded" and (body or kind):
        raise ApiError(415, "send the form as application/x-www-form-urlencoded")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the form is not valid urlencoded UTF-8") from None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request) -> bool:
    """True unless the browser says the request comes from another origin (``Origin``, else ``Referer``).

    This server's origin is the one the request arrived on, or that of ``QKIT_API_PUBLIC_URL`` (behind a
    TLS-terminating proxy the browser's origin is ``https://`` while the request reaching us is not).
    """
    sent = request.headers.get("origin") or request.headers.get("referer")
    if not sent:
        return True
    ours = {_origin(str(request.url))}
    public = os.environ.get("QKIT_API_PUBLIC_URL", "").strip()
    if public:
        ours.add(_origin(public))
    return _origin(sent) in ours


async def check_csrf(request: Request) -> tuple[Viewer, dict[str, str]]:
    """A POST from this session: 401 without one; 403 from another origin or without its CSRF token."""
    who = viewer(request)
    if who is None:
        raise ApiError(401, "sign in first: the session is missing or has expired")
    form = await read_form(request)
    sent = form.get("csrf") or request.headers.get("x-csrf-token") or ""
    if not same_origin(request) or not hmac.compare_digest(sent.encode("utf-8"), who.csrf.encode("utf-8")):
        raise ApiError(403, "refused: the form's CSRF token is missing or wrong (reload the page)")
    return who, form


async def action(request: Request, *, job_owner: Any = None, cancel: bool = False) -> tuple[Viewer, dict[str, str]]:
    """Check an action POST: :func:`check_csrf`, then the role (403: a read-only session acts on nothing).

    ``cancel``: a user may cancel a job they own (``job_owner``); everything else needs an admin.
    """
    who, form = await check_csrf(request)
    if not (who.can_cancel(job_owner) if cancel else who.can_act):
        raise ApiError(403, "this session may only read")
    return who, form


def safe_next(target: str | None) -> str:
    """A local path to go to after signing in ('/' for anything else: no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target

"""Settings from the environment (SPEC §2), overridable by keyword arguments.

Precedence: explicit arguments > Upstash variables > ``QKIT_REDIS_URL`` >
the embedded server.  Every malformed value gives one line naming the
variable; secrets are redacted from every message (:func:`redact`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from qkit.errors import ConfigError

DEFAULT_QUEUE = "default"


def project_root(start: Path | None = None) -> Path:
    """The nearest ancestor of ``start`` holding ``pyproject.toml`` or ``.qkit/``.

    So the CLI run from the project root and a notebook run from
    ``notebooks/`` share one state.  Falls back to ``start`` itself.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() or (folder / ".qkit").is_dir():
            return folder
    return here


def default_home() -> Path:
    """``QKIT_HOME``, or ``.qkit/`` in the project root."""
    env = os.environ.get("QKIT_HOME")
    return Path(env).expanduser().resolve() if env else project_root() / ".qkit"


_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)


def redact(text: str) -> str:
    """Mask passwords in URLs and known secret values inside ``text``."""
    text = _SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    for name in ("UPSTASH_REDIS_REST_TOKEN", "WORKER_SECRET", "QKIT_API_TOKEN",
                 "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _float_env(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum or value != value or value == float("inf"):
        raise ConfigError(f"{name}={raw!r} must be a finite number >= {minimum:g}")
    return value


def check_redis_url(url: str, variable: str = "QKIT_REDIS_URL") -> str:
    """Refuse a Redis URL that redis-py could not use, naming the variable."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{variable} must start with redis://, rediss:// or unix:// (got {redact(url)!r})")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{variable} has no host: {redact(url)!r}")
    try:
        parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{variable} has an invalid port: {redact(url)!r}") from None
    return url


def check_upstash_url(url: str) -> str:
    """Refuse an Upstash REST URL that is not http(s)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"UPSTASH_REDIS_REST_URL must be an http(s) URL (got {redact(url)!r})")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"UPSTASH_REDIS_REST_URL has an invalid port: {redact(url)!r}") from None
    return urlunsplit(parts).rstrip("/")


def check_database_url(url: str) -> str:
    """Refuse a ledger URL SQLAlchemy cannot parse, naming the variable."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"QKIT_DATABASE_URL is not a database URL: {redact(url)!r}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"QKIT_DATABASE_URL must be sqlite or postgresql (got {parsed.get_backend_name()!r})")
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # plain postgresql:// would pick psycopg2, which qkit does not ship
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


@dataclass
class Settings:
    """Everything a queue needs to know, resolved once by :func:`settings`."""

    home: Path
    redis_url: str | None = None
    upstash_url: str | None = None
    upstash_token: str | None = field(default=None, repr=False)
    database_url: str = ""
    backoff_base: float = 2.0
    backoff_max: float = 300.0
    lease_seconds: float = 60.0
    handler_modules: tuple[str, ...] = ()
    #: seconds of waiting worth one priority level (0: strict priority); see qkit/scripts/claim.lua
    priority_aging: float = 0.0

    @property
    def backend_kind(self) -> str:
        if self.upstash_url:
            return "upstash"
        return "redis" if self.redis_url else "embedded"


def settings(
    *,
    redis_url: str | None = None,
    upstash_url: str | None = None,
    upstash_token: str | None = None,
    database_url: str | None = None,
    home: str | os.PathLike[str] | None = None,
    backoff_base: float | None = None,
    backoff_max: float | None = None,
    lease_seconds: float | None = None,
    priority_aging: float | None = None,
) -> Settings:
    """Resolve settings: keyword arguments first, then the environment, then defaults."""
    home_path = Path(home).expanduser().resolve() if home is not None else default_home()

    if upstash_url is None and redis_url is None:
        upstash_url = os.environ.get("UPSTASH_REDIS_REST_URL") or None
        if upstash_url is None:
            redis_url = os.environ.get("QKIT_REDIS_URL") or None
    if upstash_url:
        upstash_url = check_upstash_url(upstash_url)
        upstash_token = upstash_token if upstash_token is not None else os.environ.get("UPSTASH_REDIS_REST_TOKEN")
        if not upstash_token:
            raise ConfigError("UPSTASH_REDIS_REST_TOKEN is not set (UPSTASH_REDIS_REST_URL is)")
        redis_url = None
    elif redis_url:
        redis_url = check_redis_url(redis_url)

    db = database_url if database_url is not None else os.environ.get("QKIT_DATABASE_URL") or None
    db = check_database_url(db) if db else f"sqlite:///{home_path / 'ledger.sqlite3'}"

    base = backoff_base if backoff_base is not None else _float_env("QKIT_BACKOFF_BASE", 2.0)
    cap = backoff_max if backoff_max is not None else _float_env("QKIT_BACKOFF_MAX", 300.0)
    lease = lease_seconds if lease_seconds is not None else _float_env("QKIT_LEASE_SECONDS", 60.0, 0.1)
    if base < 0 or cap < 0:
        raise ConfigError("back-off base and cap must be >= 0")
    if lease <= 0:
        raise ConfigError("lease_seconds must be > 0")
    modules = tuple(m.strip() for m in os.environ.get("QKIT_HANDLERS", "").split(",") if m.strip())
    aging = priority_aging if priority_aging is not None else _float_env("QKIT_PRIORITY_AGING_SECONDS", 0.0)
    aging = check_priority_aging(aging)
    return Settings(home=home_path, redis_url=redis_url, upstash_url=upstash_url, upstash_token=upstash_token,
                    database_url=db, backoff_base=float(base), backoff_max=float(cap),
                    lease_seconds=float(lease), handler_modules=modules, priority_aging=aging)


#: the largest priority-aging step, seconds: keeps every ready score an exact
#: integer below 2**53 (|priority| <= 10**6, so the boost is at most 3.6e15 µs)
MAX_PRIORITY_AGING = 3600.0


def check_priority_aging(value: object) -> float:
    """``QKIT_PRIORITY_AGING_SECONDS`` / ``priority_aging``: 0 (strict priority) .. 3600 seconds per level."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"QKIT_PRIORITY_AGING_SECONDS must be a number of seconds (got {value!r})")
    if not 0 <= value <= MAX_PRIORITY_AGING:
        raise ConfigError(f"QKIT_PRIORITY_AGING_SECONDS={value!r} is out of range 0..{MAX_PRIORITY_AGING:g} "
                          "(seconds of waiting worth one priority level)")
    return float(value)

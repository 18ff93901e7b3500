"""Settings from the environment (docs/semantics.md#configuration), overridable by keyword arguments.

Precedence: explicit arguments > Upstash variables > ``QKIT_REDIS_URL`` >
the embedded server.  Every malformed value gives one line naming the
variable; secrets are redacted from every message (:func:`redact`).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from qkit.errors import BadInput, ConfigError

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


#: the user info of a URL with a password, matched right after its ``scheme://``.  Bounded, and
#: only tried where ``://`` occurs: redact() runs on handler messages of any size (a 1 MB message
#: made the old unanchored ``[a-z][a-z0-9+.-]*://`` pattern backtrack quadratically: minutes)
_USERINFO = re.compile(r"(?P<user>[^:/@\s]{0,1024}):(?P<pw>[^@/\s]{1,1024})@")
_SCHEME_CHARS = frozenset(string.ascii_letters + string.digits + "+.-")
_MAX_SCHEME = 32


def _url_passwords(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each password in a ``scheme://user:password@`` inside ``text``, in linear time."""
    at = text.find("://")
    while at != -1:
        start = at
        while start > 0 and at - start < _MAX_SCHEME and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        while start < at and text[start] not in string.ascii_letters:  # a scheme starts with a letter
            start += 1
        m = _USERINFO.match(text, at + 3) if start < at else None
        if m:
            yield m.start("pw"), m.end("pw")
            at = text.find("://", m.end())
        else:
            at = text.find("://", at + 3)


def has_url_password(text: str) -> bool:
    """True when ``text`` holds a URL with a password (``scheme://user:password@...``)."""
    return next(_url_passwords(text), None) is not None


#: variables whose whole value is a secret
SECRET_VARIABLES = ("UPSTASH_REDIS_REST_TOKEN", "WORKER_SECRET", "QKIT_API_TOKEN", "QKIT_API_READ_TOKEN",
                    "QKIT_METRICS_TOKEN", "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY",
                    # the real HTTP handlers' keys (qkit.engine.http_handlers)
                    "QKIT_OPENAI_API_KEY", "QKIT_IMAGES_API_KEY", "QKIT_FIRECRAWL_API_KEY", "QKIT_PUBLISH_WEBHOOK_SECRET",
                    "QKIT_PUBLISH_WEBHOOK_URL")
#: variables holding a URL whose password is a secret
SECRET_URL_VARIABLES = ("QKIT_REDIS_URL", "QKIT_DATABASE_URL")


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact(text: str) -> str:
    """Mask passwords in URLs and known secret values inside ``text``.

    Known secrets are the values of :data:`SECRET_VARIABLES` and the passwords
    of the URLs in :data:`SECRET_URL_VARIABLES` (also outside a URL, e.g. a
    handler's message quoting a password alone), when at least 6 characters.
    """
    parts, last = [], 0
    for start, end in _url_passwords(text):
        parts += [text[last:start], "***"]
        last = end
    text = "".join(parts) + text[last:] if parts else text
    secrets_ = [os.environ.get(name) or "" for name in SECRET_VARIABLES]
    for name in SECRET_URL_VARIABLES:
        password = _url_password(os.environ.get(name) or "")
        if password:
            secrets_ += [password, unquote(password)]
    for secret in sorted(set(secrets_), key=len, reverse=True):  # longest first: no partial masks
        if len(secret) >= 6 or (secret in secrets_[:len(SECRET_VARIABLES)] and len(secret) >= 4):
            text = text.replace(secret, "***")
    return text


def url_for_messages(url: str) -> str:
    """``url`` without user info (a password) or query string, for messages and ``describe()``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


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


#: the embedded server's idle exit: seconds with no client, 0 = never
DEFAULT_EMBEDDED_IDLE_SECONDS = 900.0


def embedded_idle_seconds() -> float:
    """``QKIT_EMBEDDED_IDLE_SECONDS``: the embedded server exits after this long with no client (0: never)."""
    return _float_env("QKIT_EMBEDDED_IDLE_SECONDS", DEFAULT_EMBEDDED_IDLE_SECONDS)


#: what qkit keeps in a home, made private again in a home created before it was (0755/0644)
_HOME_ENTRIES = ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm", "ledger.sqlite3-journal",
                 "redis", "locks")


def _mine(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid()


def make_private(path: Path) -> None:
    """``path`` and, for a folder, everything under it: folders 0700, files 0600 (ours only, links skipped)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) or not _mine(st):
        return
    want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
    if stat.S_IMODE(st.st_mode) & ~want:
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(st.st_mode) & want)
    if stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            for entry in os.scandir(path):
                make_private(Path(entry.path))


def private_home(home: Path) -> Path:
    """Create ``QKIT_HOME`` 0700, or make an existing one 0700 with its qkit files 0600 (docs/semantics.md#configuration).

    A shared folder given as ``QKIT_HOME`` (sticky like ``/tmp``, the user's home, ``/``) keeps
    its mode; qkit's own entries in it are still made private.
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(home)
    if not stat.S_IMODE(st.st_mode) & 0o077 or not _mine(st):
        return home
    if not st.st_mode & stat.S_ISVTX and home not in (Path(home.anchor), Path.home()):
        with contextlib.suppress(OSError):
            os.chmod(home, 0o700)
    for name in _HOME_ENTRIES:  # only qkit's own: QKIT_HOME may hold the user's files too
        make_private(home / name)
    return home


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 (missing folders 0700) unless it exists; make it 0600.

    SQLite gives a database's ``-wal`` and ``-shm`` files the database file's mode.
    """
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        make_private(p)
    return path


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
    #: seconds of waiting worth one priority level (0: strict priority); see qkit/lua/claim.lua
    priority_aging: float = 0.0
    #: QKIT_UPSTASH_KEY_LOCKING: send scripts to Upstash with ``#!lua flags=allow-key-locking`` (docs/upstash.md)
    upstash_key_locking: str = "auto"

    @property
    def backend_kind(self) -> str:
        """Where the dispatch index lives: ``upstash``, ``redis`` or ``embedded``.

        The one place the choice is made (from what :func:`settings` resolved:
        Upstash variables win over ``QKIT_REDIS_URL``); :func:`qkit.backends.open_backend`
        opens the backend this names.
        """
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
    if not db or not (redis_url or upstash_url):  # the home holds the ledger or the embedded server
        check_home(home_path)
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
    key_locking = os.environ.get("QKIT_UPSTASH_KEY_LOCKING", "auto").strip().lower() or "auto"
    if key_locking not in KEY_LOCKING_CHOICES:
        raise ConfigError(f"QKIT_UPSTASH_KEY_LOCKING={key_locking!r} must be one of {', '.join(KEY_LOCKING_CHOICES)}")
    return Settings(upstash_key_locking=key_locking, home=home_path, redis_url=redis_url, upstash_url=upstash_url, upstash_token=upstash_token,
                    database_url=db, backoff_base=float(base), backoff_max=float(cap),
                    lease_seconds=float(lease), handler_modules=modules, priority_aging=aging)


#: QKIT_UPSTASH_KEY_LOCKING's values: auto (only for hosts under upstash.io), on, off
KEY_LOCKING_CHOICES = ("auto", "on", "off")


#: the keyword overrides :func:`settings` (and so :func:`qkit.connect`) accepts
OVERRIDES = frozenset(inspect.signature(settings).parameters)


def check_overrides(overrides: dict, what: str = "connect") -> None:
    """Refuse keyword overrides :func:`settings` does not know, in one line naming them."""
    unknown = set(overrides) - OVERRIDES
    if unknown:
        raise BadInput(f"unknown option(s) for {what}: {', '.join(sorted(unknown))}")


def check_home(path: Path) -> Path:
    """QKIT_HOME (or ``home=``) must be a directory this process can create and write: refused in
    one line naming it (exit 2: it is the user's configuration) rather than failing later inside
    the ledger or the embedded server.  Created private when missing (:func:`private_home`)."""
    try:
        private_home(path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, FileExistsError):
            reason = "it exists and is not a directory"
        raise ConfigError(f"QKIT_HOME={str(path)!r} cannot be used as qkit's home directory: {reason}") from None
    return path


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

"""qkit.config without servers: backend choice and precedence, overrides, URL checks, numbers from the environment."""
from __future__ import annotations

import inspect

import pytest

import qkit
from qkit.config import (DEFAULT_EMBEDDED_IDLE_SECONDS, OVERRIDES, check_overrides, embedded_idle_seconds, settings,
                         url_for_messages)
from qkit.errors import BadInput, ConfigError

BACKEND_VARS = ("UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_REDIS_URL", "QKIT_DATABASE_URL",
                "QKIT_BACKOFF_BASE", "QKIT_BACKOFF_MAX", "QKIT_LEASE_SECONDS", "QKIT_PRIORITY_AGING_SECONDS",
                "QKIT_EMBEDDED_IDLE_SECONDS", "QKIT_HANDLERS")


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment: no backend variables, a private home under tmp_path."""
    for name in BACKEND_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QKIT_HOME", str(tmp_path / "home"))
    return monkeypatch


def test_embedded_by_default_with_the_ledger_in_the_home(env, tmp_path):
    s = settings()
    assert s.backend_kind == "embedded" and s.redis_url is None and s.upstash_url is None
    assert s.home == (tmp_path / "home").resolve()
    assert s.database_url == f"sqlite:///{s.home / 'ledger.sqlite3'}"
    assert (s.home.stat().st_mode & 0o777) == 0o700  # created private


def test_redis_url_from_the_environment(env):
    env.setenv("QKIT_REDIS_URL", "redis://127.0.0.1:6390/2")
    s = settings()
    assert (s.backend_kind, s.redis_url) == ("redis", "redis://127.0.0.1:6390/2")


def test_upstash_wins_over_redis_url_and_needs_its_token(env):
    env.setenv("QKIT_REDIS_URL", "redis://127.0.0.1:6390/0")
    env.setenv("UPSTASH_REDIS_REST_URL", "https://eu1-x.upstash.io/")
    with pytest.raises(ConfigError, match="^UPSTASH_REDIS_REST_TOKEN is not set"):
        settings()
    env.setenv("UPSTASH_REDIS_REST_TOKEN", "tok-123456")
    s = settings()
    assert (s.backend_kind, s.upstash_url, s.redis_url) == ("upstash", "https://eu1-x.upstash.io", None)
    assert "tok-123456" not in repr(s)


def test_keyword_arguments_override_the_environment(env):
    env.setenv("UPSTASH_REDIS_REST_URL", "https://eu1-x.upstash.io")
    s = settings(redis_url="redis://h:1/0")  # an explicit Redis URL: the Upstash variables are not read
    assert (s.backend_kind, s.redis_url) == ("redis", "redis://h:1/0")
    s = settings(upstash_url="http://127.0.0.1:1", upstash_token="t")
    assert s.backend_kind == "upstash"


@pytest.mark.parametrize("kw, message", [
    ({"redis_url": "http://h:1"}, "^QKIT_REDIS_URL must start with redis://"),
    ({"redis_url": "redis://:pw-secret@h:99999/0"}, "^QKIT_REDIS_URL has an invalid port"),
    ({"redis_url": "redis:///0"}, "^QKIT_REDIS_URL has no host"),
    ({"upstash_url": "ftp://h", "upstash_token": "t"}, "^UPSTASH_REDIS_REST_URL must be an http"),
    ({"database_url": "mysql://h/db"}, "^QKIT_DATABASE_URL must be sqlite or postgresql"),
    ({"database_url": "not a url"}, "^QKIT_DATABASE_URL is not a database URL"),
    ({"backoff_base": -1}, "^back-off base and cap must be >= 0"),
    ({"lease_seconds": 0}, "^lease_seconds must be > 0"),
    ({"priority_aging": 3601}, "^QKIT_PRIORITY_AGING_SECONDS=3601 is out of range"),
])
def test_bad_values_are_one_line_without_secrets(env, kw, message):
    with pytest.raises(ConfigError, match=message) as caught:
        settings(**kw)
    assert "\n" not in str(caught.value) and "pw-secret" not in str(caught.value)


def test_postgresql_urls_get_the_shipped_driver(env):
    s = settings(database_url="postgresql://u:p@db.example/qkit")
    assert s.database_url.startswith("postgresql+psycopg://")


@pytest.mark.parametrize("raw, expected", [("", DEFAULT_EMBEDDED_IDLE_SECONDS), ("  ", DEFAULT_EMBEDDED_IDLE_SECONDS),
                                           ("0", 0.0), ("2.5", 2.5), ("900", 900.0)])
def test_embedded_idle_seconds(env, raw, expected):
    env.setenv("QKIT_EMBEDDED_IDLE_SECONDS", raw)
    assert embedded_idle_seconds() == expected


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "inf"])
def test_embedded_idle_seconds_refuses_what_is_not_a_duration(env, raw):
    env.setenv("QKIT_EMBEDDED_IDLE_SECONDS", raw)
    with pytest.raises(ConfigError, match=f"^QKIT_EMBEDDED_IDLE_SECONDS={raw!r}"):
        embedded_idle_seconds()


def test_env_numbers_are_checked(env):
    env.setenv("QKIT_BACKOFF_BASE", "fast")
    with pytest.raises(ConfigError, match="^QKIT_BACKOFF_BASE='fast' is not a number$"):
        settings()
    env.setenv("QKIT_BACKOFF_BASE", "0.5")
    env.setenv("QKIT_HANDLERS", " a.b , ,c ")
    s = settings()
    assert s.backoff_base == 0.5 and s.handler_modules == ("a.b", "c")


def test_overrides_are_the_settings_keywords():
    assert OVERRIDES == set(inspect.signature(settings).parameters)
    check_overrides({"home": "x", "lease_seconds": 1})
    with pytest.raises(BadInput, match="^unknown option\\(s\\) for connect: colour, size$"):
        check_overrides({"colour": 1, "size": 2, "home": "x"})
    with pytest.raises(BadInput, match="^unknown option\\(s\\) for connect: colour$"):
        qkit.connect(colour="red")  # refused before anything is opened


def test_url_for_messages_drops_user_info_and_query():
    assert url_for_messages("https://user:pw@db.upstash.io:443/x?token=t#f") == "https://db.upstash.io:443/x"
    assert url_for_messages("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"

"""qkit.config.redact without servers: URL passwords and known secrets are masked anywhere in a text."""
from __future__ import annotations

import pytest

from qkit.config import SECRET_URL_VARIABLES, SECRET_VARIABLES, has_url_password, redact


@pytest.fixture(autouse=True)
def no_secrets(monkeypatch):
    for name in (*SECRET_VARIABLES, *SECRET_URL_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("text, expected", [
    ("redis://:hunter22@h:6379/0", "redis://:***@h:6379/0"),
    ("postgresql+psycopg://u:p%40ss@db/q and redis://u:x@h", "postgresql+psycopg://u:***@db/q and redis://u:***@h"),
    ("no url here", "no url here"),
    ("redis://h:6379/0 (no password)", "redis://h:6379/0 (no password)"),
    ("error at http://user@h/ (user only)", "error at http://user@h/ (user only)"),
])
def test_url_passwords_are_masked(text, expected):
    assert redact(text) == expected
    assert has_url_password(text) == (expected != text)


def test_secret_values_are_masked_anywhere(no_secrets):
    no_secrets.setenv("QKIT_API_TOKEN", "tok-abcdef-123")
    no_secrets.setenv("QKIT_REDIS_URL", "redis://:p%40ssword1@h:1/0")
    text = "token tok-abcdef-123 and password p@ssword1 (quoted p%40ssword1 too)"
    out = redact(text)
    assert "tok-abcdef-123" not in out and "p@ssword1" not in out and "p%40ssword1" not in out
    assert out == "token *** and password *** (quoted *** too)"


def test_short_secrets_are_not_masked_inside_words(no_secrets):
    no_secrets.setenv("QKIT_DATABASE_URL", "postgresql://u:abc@db/q")  # a 3-character password
    assert redact("abcdef cab") == "abcdef cab"
    no_secrets.setenv("WORKER_SECRET", "abcd")  # a whole-value secret of 4 characters is masked
    assert redact("x abcd y") == "x *** y"


def test_a_longer_secret_is_masked_whole_before_a_shorter_one(no_secrets):
    no_secrets.setenv("QKIT_API_TOKEN", "secret-long-123")
    no_secrets.setenv("WORKER_SECRET", "secret")
    assert redact("secret-long-123 / secret") == "*** / ***"


def test_many_schemes_stay_linear():
    text = "a://" * 20000 + "x://u:pw-0123@h"
    assert redact(text).endswith("x://u:***@h")

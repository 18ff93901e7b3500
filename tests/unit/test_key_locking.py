"""Which Upstash hosts get the ``allow-key-locking`` flag (qkit.backends.upstash.uses_key_locking)."""
import pytest

from qkit.backends.upstash import uses_key_locking


@pytest.mark.parametrize("host, setting, expected", [
    ("eu1-fit-cat-12345.upstash.io", "auto", True),
    ("EU1-FIT-CAT.UPSTASH.IO.", "auto", True),
    ("upstash.io", "auto", True),
    ("127.0.0.1", "auto", False),
    ("notupstash.io", "auto", False),
    ("upstash.io.evil.example", "auto", False),
    ("127.0.0.1", "on", True),
    ("db.upstash.io", "off", False),
])
def test_auto_means_upstash_own_hosts(host, setting, expected):
    assert uses_key_locking(host, setting) is expected

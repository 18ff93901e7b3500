"""Backends: where the dispatch index lives.  :func:`open_backend` picks one."""
from __future__ import annotations

from qkit.backends.base import Backend
from qkit.config import Settings


def open_backend(settings: Settings) -> Backend:
    """Upstash if configured, else ``QKIT_REDIS_URL``, else the embedded server."""
    if settings.upstash_url:
        from qkit.backends.upstash import UpstashBackend

        return UpstashBackend(settings.upstash_url, settings.upstash_token or "")
    if settings.redis_url:
        from qkit.backends.redis import RedisBackend

        return RedisBackend(settings.redis_url)
    from qkit.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(settings.home)


__all__ = ["Backend", "open_backend"]

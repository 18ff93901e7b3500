"""Backends: where the dispatch index lives.  :func:`open_backend` picks one."""
from __future__ import annotations

from qkit.backends.base import Backend
from qkit.config import Settings


def open_backend(settings: Settings) -> Backend:
    """The backend :attr:`Settings.backend_kind` names (Upstash, ``QKIT_REDIS_URL``, or embedded)."""
    kind = settings.backend_kind
    if kind == "upstash":
        from qkit.backends.upstash import UpstashBackend

        return UpstashBackend(settings.upstash_url or "", settings.upstash_token or "",
                              key_locking=settings.upstash_key_locking)
    if kind == "redis":
        from qkit.backends.redis import RedisBackend

        return RedisBackend(settings.redis_url or "")
    from qkit.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(settings.home)


__all__ = ["Backend", "open_backend"]

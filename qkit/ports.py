"""A free local TCP port, for servers qkit starts itself (the embedded Redis, ``qkit lab``)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A 127.0.0.1 TCP port that was free a moment ago.

    The socket is closed before returning because the server must bind the
    port itself; another process can take it meanwhile, so starters retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""The cyclic garbage collector kept off what existed before a hot loop (a burst, a batch of enqueues).

A hot loop allocates objects that live until it ends (a batch's items, rows, jobs and outcomes), so the
collector's full collections come round while it runs, and each scans the whole heap: the modules, the
engines' metadata, a notebook's data.  That was about a sixth of a no-op job's CPU in a burst and in
``enqueue_many`` (bench/README.md#profiles).  While a loop holds the collector (:func:`hold`, :func:`frozen`),
what existed when the first of them started is in the permanent generation (``gc.freeze``) and is not
scanned; what is made meanwhile is collected as usual.  When the last holder of the process releases, everything is
handed back (``gc.unfreeze``): cyclic garbage among the frozen objects is collected from then on.
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_holders = 0  # loops of this process holding the collector now (bursts of `qkit serve`, enqueues of threads)


def hold() -> None:
    """Freeze what exists now, unless another loop holds already; pair with :func:`release`.

    Only the first holder freezes: a later freeze would also take in the garbage made since the
    first (a ``--forever`` burst holds for the life of the process), and never collect it."""
    global _holders
    with _lock:
        _holders += 1
        if _holders == 1:
            gc.freeze()


def release() -> None:
    """The end of a :func:`hold`: the last one of the process unfreezes."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            gc.unfreeze()


@contextmanager
def frozen() -> Iterator[None]:
    """:func:`hold` for the length of a ``with`` block."""
    hold()
    try:
        yield
    finally:
        release()

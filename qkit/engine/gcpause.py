"""The cyclic garbage collector kept out of a hot loop's way (a burst, the building of an enqueue batch).

A hot loop allocates objects that live until it ends (a batch's items, rows, jobs and outcomes), so the
collector's full collections come round while it runs, and each scans the whole heap: the modules, the
engines' metadata, a notebook's data.  That was about a sixth of a no-op job's CPU in a burst and in
``enqueue_many`` (bench/README.md#profiles).  Two ways, both counted per process so that loops of several
threads (bursts of ``qkit serve``, a handler's enqueues) leave the collector as the first found it:

- :func:`hold` / :func:`release`, a burst, which may last a process's life (``--forever``): what existed
  when the first holder started is put in the permanent generation (``gc.freeze``) and not scanned, what
  is made meanwhile is collected as usual; the last release hands it all back (``gc.unfreeze``).  A heap
  frozen by the application before (a pre-fork server, as Python advises) is left frozen.
- :func:`paused`, a short loop (one ``enqueue_many``): no collection at all until it ends
  (``gc.disable``), unless the collector was off already.  It leaves ``gc.freeze`` alone: a process that
  froze its heap before forking (Python's advice for pre-fork servers) keeps it frozen.
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_holders = 0  # bursts of this process holding the heap frozen now
_we_froze = False  # whether the first of them froze it (nothing was frozen before)
_pausers = 0  # short loops of this process with the collector paused now
_we_disabled = False  # whether the first of those turned the collector off (it was on)


def hold() -> None:
    """Freeze what exists now, unless another loop holds already; pair with :func:`release`.

    Only the first holder freezes: a later freeze would also take in the garbage made since the
    first (a ``--forever`` burst holds for the life of the process), and never collect it.  A heap the
    application froze itself (a pre-fork server) is left as it is, and not unfrozen at the end."""
    global _holders, _we_froze
    with _lock:
        _holders += 1
        if _holders == 1:
            _we_froze = gc.get_freeze_count() == 0  # (a walk of the frozen objects: once per burst)
            if _we_froze:
                gc.freeze()


def release() -> None:
    """The end of a :func:`hold`: the last one of the process unfreezes."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0 and _we_froze:
            gc.unfreeze()


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection during the ``with`` block (nor during others' that overlap it); the collector
    is turned back on when the last of them ends, if the first found it on."""
    global _pausers, _we_disabled
    with _lock:
        if _pausers == 0:
            _we_disabled = gc.isenabled()
            if _we_disabled:
                gc.disable()
        _pausers += 1
    try:
        yield
    finally:
        with _lock:
            _pausers -= 1
            if _pausers == 0 and _we_disabled:
                gc.enable()

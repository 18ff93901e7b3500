"""Run a Python program with this process's wall clock shifted: the soak's clock-skew fault.

``QKIT_SOAK_CLOCK_SKEW=<seconds> python bench/skewed.py -m qkit.cli work ...`` or
``... python bench/skewed.py path/to/script.py args...``

When the variable is set (e.g. ``3600`` or ``-3600``), the wall clock of the
process is that many seconds off, the way ``tests/test_faults.py`` (F15)
shifts a worker's clock: ``time.time`` and ``time.time_ns`` return the real
time plus the shift, and so do ``datetime.now``/``utcnow``/``today`` (which
read the system clock in C, so ``datetime.datetime`` is replaced by a subclass
before the program imports it).  It models a host whose clock is off: every
timestamp the process writes, to Redis or to the ledger, is off too.  Unset
or empty, the program runs unchanged.  ``time.monotonic`` is left alone (it
is not a wall clock; the soak orders events across processes by it).
"""
from __future__ import annotations

import os
import runpy
import sys
import time

ENV = "QKIT_SOAK_CLOCK_SKEW"


def shift_clock(seconds: float) -> None:
    import datetime as dt

    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + seconds
    time.time_ns = lambda: real_time_ns() + int(seconds * 1e9)
    real, delta = dt.datetime, dt.timedelta(seconds=seconds)

    class Meta(type):  # a datetime made by C code (a driver, fromtimestamp) still counts as one
        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, real)

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, real)

    class SkewedDatetime(real, metaclass=Meta):
        # no __dict__: the same size as datetime, which C extensions (psycopg's) check when they
        # import it after this replacement
        __slots__ = ()

        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206 - datetime's signature
            return real.now(tz) + delta

        @classmethod
        def utcnow(cls):  # noqa: ANN206
            return real.utcnow() + delta

        @classmethod
        def today(cls):  # noqa: ANN206
            return real.today() + delta

    dt.datetime = SkewedDatetime


def main() -> None:
    skew = os.environ.get(ENV, "").strip()
    if skew:
        shift_clock(float(skew))
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()

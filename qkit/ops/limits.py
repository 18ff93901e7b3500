"""Limits per job type: set, list, remove, restore after a Redis restart, audit, and the view of what they held.

The ledger's ``queue_controls`` rows (kind ``limit``) are the truth; Redis holds
the working copy the claim script reads (``qkit/lua/_limits.lua``).  Setting a
limit writes the ledger first, then Redis: the limits, the type of each job of
that type Redis already holds (jobs pushed later get theirs from the push
script), then the concurrency in use recounted from the leases held.  A Redis
that lost the copy gets it back the same way (:func:`restore`: ``qkit audit
--repair``, and a burst that finds Redis lost jobs).  See docs/semantics.md#limits-per-type.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qkit.engine.handlers import get_handler, import_handler_modules
from qkit.engine.limits import Limit, check_limit, check_type
from qkit.errors import BadInput
from qkit.logs import log

if TYPE_CHECKING:
    from qkit.engine.queue import Queue


def set_limit(q: "Queue", job_type: str, *, rate: Any = None, per: Any = 60.0,
              concurrency: Any = None) -> dict[str, Any]:
    """Limit ``job_type``; returns the limit as stored.  Bad values: BadInput, nothing changed."""
    job_type = check_type(job_type)
    limit = check_limit(rate, per, concurrency)
    import_handler_modules(q.settings.handler_modules)
    if get_handler(job_type) is None and not q.ledger.has_type(q.name, job_type):
        raise BadInput(f"job type {job_type!r} is unknown: no handler is registered for it and queue "
                       f"{q.name!r} has no job of it")
    q.ledger.put_limit(q.name, job_type, limit.to_value())
    restore(q, only=[job_type])
    return limit.to_value()


def remove_limit(q: "Queue", job_type: str) -> bool:
    """Lift the limit of ``job_type``; True if it had one."""
    job_type = check_type(job_type)
    existed = q.ledger.delete_limit(q.name, job_type)
    q.dispatch.set_limits(_specs(q))
    return existed


def list_limits(q: "Queue") -> dict[str, dict[str, Any]]:
    """type -> ``{"rate", "per", "concurrency"}`` of every limit of the queue (the ledger's copy)."""
    return {t: lim.to_value() for t, lim in current_limits(q).items()}


def current_limits(q: "Queue") -> dict[str, Limit]:
    """type -> :class:`Limit` of every limit of the queue (the ledger's copy)."""
    out = {}
    for job_type, value in q.ledger.limit_rows(q.name).items():
        try:
            out[job_type] = Limit.from_value(value)
        except BadInput as exc:  # a row edited by hand: that type runs unlimited, and says so
            log.warning("queue %s: the limit of type %r is ignored: %s", q.name, job_type, exc)
    return out


def _specs(q: "Queue") -> dict[str, str]:
    return {t: lim.spec() for t, lim in current_limits(q).items()}


def restore(q: "Queue", *, only: list[str] | None = None) -> dict[str, Any]:
    """Make Redis's copy of the limits the ledger's: the limits, the types of the jobs it holds, the
    concurrency in use.  ``only``: type only the jobs of these types (the others are typed already)."""
    specs = _specs(q)
    q.dispatch.set_limits(specs)
    tagged = 0
    for job_type in (only if only is not None else sorted(specs)):
        if job_type in specs:
            tagged += q.dispatch.tag_limited(job_type, q.ledger.active_ids_of_type(q.name, job_type))
    running = q.dispatch.recount_limited()
    return {"limits": len(specs), "typed": tagged, "running": running}


def drift(q: "Queue") -> list[str]:
    """What differs between the ledger's limits and Redis's copy, one line each (empty: they agree)."""
    specs = _specs(q)
    stored = {f[2:]: v for f, v in q.dispatch.read_limits().items() if f.startswith("L:")}
    problems = [f"type {t!r} counts {in_use} slot(s) in use, but {held} lease(s) of it are held"
                for t, (held, in_use) in sorted(q.dispatch.limited_slots().items()) if held != in_use]
    for job_type in sorted(set(specs) | set(stored)):
        if job_type not in stored:
            problems.append(f"limit of type {job_type!r} is in the ledger but not in Redis")
        elif job_type not in specs:
            problems.append(f"limit of type {job_type!r} is in Redis but not in the ledger")
        elif specs[job_type] != stored[job_type]:
            problems.append(f"limit of type {job_type!r} differs: ledger {specs[job_type]!r}, "
                            f"Redis {stored[job_type]!r}")
    return problems

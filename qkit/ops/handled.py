"""Does a job type have a handler somewhere: built in, registered in this process, in a module
``QKIT_HANDLERS`` names, or run by some worker before (the ledger remembers)?

``qkit enqueue`` warns for a type that has none, and ``qkit explain`` does not
advise replaying a job of such a type (docs/semantics.md#interfaces).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qkit.engine.handlers import get_handler, import_handler_modules
from qkit.errors import ConfigError
from qkit.ledger.types import was_handled

if TYPE_CHECKING:
    from qkit.engine.queue import Queue


def registered_here(q: "Queue", type: str) -> bool:
    """True if this process has a handler for ``type``: built in, ``@qkit.handler``, or in ``QKIT_HANDLERS``."""
    if get_handler(type) is not None:
        return True
    try:
        import_handler_modules(q.settings.handler_modules)
    except ConfigError:  # a module that does not import: the workers say so; here it names nothing
        return False
    return get_handler(type) is not None


def has_handler(q: "Queue", type: str) -> bool:
    """True if ``type`` has a handler here or some worker has run a job of it (the ledger's memory)."""
    return registered_here(q, type) or was_handled(q.ledger, type)


def unknown_type_warning(q: "Queue", type: str) -> str | None:
    """One line warning that no worker knows ``type``, or None when it has a handler."""
    if has_handler(q, type):
        return None
    return (f"warning: no worker has handled job type {type!r} yet, and it is not built in or in a module "
            "QKIT_HANDLERS names; a worker without a handler for it fails the job (UnknownJobType)")

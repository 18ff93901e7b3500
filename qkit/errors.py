"""qkit's exceptions.  Each carries one line a user can act on."""
from __future__ import annotations


class QkitError(Exception):
    """Base of every error qkit raises on purpose."""

    #: the CLI exit status for this kind of error (docs/semantics.md#bad-input-and-caps)
    exit_code = 1


class BadInput(QkitError, ValueError):
    """The caller asked for something invalid; nothing was written."""

    exit_code = 2


class NotFound(BadInput, LookupError):
    """No job with that id (in that queue)."""


class Conflict(BadInput):
    """The request is valid but not in the job's current state (e.g. replay of a non-failed job)."""


class ConfigError(QkitError):
    """A configuration variable is malformed; the message names the variable."""

    exit_code = 2


class BackendUnavailable(QkitError):
    """Redis (or the ledger database) cannot be reached; the message names the variable."""

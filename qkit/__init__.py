"""qkit: a priority job queue in Redis with leases, retries with back-off, a
dead-letter queue and a SQL ledger of every job and attempt.

At-least-once execution of handlers, exactly-once terminal state in the ledger.
"""
from qkit.errors import BackendUnavailable, BadInput, ConfigError, Conflict, NotFound, QkitError
from qkit.engine.handlers import current_job, handler
from qkit.engine.lifecycle import Permanent, Retry
from qkit.model import Job, WorkSummary
from qkit.engine.queue import Queue, connect

__version__ = "0.1.0"

__all__ = [
    "connect", "Queue", "Job", "WorkSummary", "handler", "current_job", "Retry", "Permanent",
    "QkitError", "BadInput", "NotFound", "Conflict", "ConfigError", "BackendUnavailable",
]

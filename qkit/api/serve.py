"""``qkit serve``: the API under uvicorn, with logging that redacts and no access log of its own."""
from __future__ import annotations

import logging

from qkit.api.app import create_app, log
from qkit.api.auth import unset_secrets
from qkit.api.bodies import ApiLimits
from qkit.config import DEFAULT_QUEUE, redact


class RedactFilter(logging.Filter):
    """Pass every log record (message and traceback) through :func:`qkit.config.redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def serve(host: str = "127.0.0.1", port: int = 8000, queue: str = DEFAULT_QUEUE) -> None:
    """Serve the API with uvicorn in the foreground until interrupted (``qkit serve``)."""
    import uvicorn

    app = create_app(queue)  # ConfigError here: one line from the CLI, nothing served
    _configure_logging()
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the API is reachable from other hosts; use TLS in front of it", host)
    for variable, routes in unset_secrets():
        log.warning("%s is not set: %s answers 503", variable, routes)
    limits: ApiLimits = app.state.limits
    log.info("qkit API for queue %r on http://%s:%d (bursts capped at %g s / %d jobs)",
             queue, host, port, limits.max_seconds, limits.max_jobs)
    # log_config=None: keep the logging set up above (with RedactFilter) for uvicorn's loggers too;
    # access_log=False: AccessLog replaces it (uvicorn's prints query strings);
    # server_header=False: the API reveals no server software.
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False,
                lifespan="on")

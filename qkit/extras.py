"""The optional parts of qkit (pip extras) and the one line that names a missing one.

``pip install qkit`` is the core: queue, worker, CLI, the Redis/Upstash/embedded
backends and the SQLite ledger.  The rest is installed by extras (pyproject.toml):

==============  ==========================================================  ===========================
extra           brings                                                      needed by
==============  ==========================================================  ===========================
``api``         starlette, uvicorn, PyJWT                                   ``qkit serve``, :mod:`qkit.api`
``notebooks``   pandas, matplotlib, papermill, jupyterlab, ipywidgets, ...  :mod:`qkit.analysis.frames`, plots,
                                                                            notebooks, scheduled runs,
                                                                            ``qkit dlq list --group``
``postgres``    psycopg                                                     a ``postgresql+psycopg://`` ledger
``all``         the three above
==============  ==========================================================  ===========================

A feature whose extra is missing raises :class:`MissingExtra` (a
:class:`~qkit.errors.QkitError` and an :class:`ImportError`): one line naming
the extra and the pip command.  The CLI prints it and exits 1 (a runtime
failure: the command was well formed, the installation lacks a part).
"""
from __future__ import annotations

import importlib.util

from qkit.errors import QkitError

#: top-level module -> the extra that installs it
MODULE_EXTRA = {
    "starlette": "api", "uvicorn": "api", "jwt": "api", "jinja2": "api", "itsdangerous": "api",
    "pandas": "notebooks", "numpy": "notebooks", "matplotlib": "notebooks", "papermill": "notebooks",
    "nbformat": "notebooks", "nbconvert": "notebooks", "ipykernel": "notebooks", "ipywidgets": "notebooks",
    "jupyterlab": "notebooks",
    "psycopg": "postgres",
}


class MissingExtra(QkitError, ImportError):
    """A feature needs an extra that is not installed; the message names it and the pip command."""

    exit_code = 1


def message(what: str, extra: str) -> str:
    """The one line: ``qkit serve needs the API extra: pip install 'qkit[api]'``."""
    return f"{what} needs the {extra.upper() if extra == 'api' else extra} extra: pip install 'qkit[{extra}]'"


def require(what: str, *modules: str) -> None:
    """Raise :class:`MissingExtra` for ``what`` when one of ``modules`` cannot be imported."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(message(what, MODULE_EXTRA[module]))


def explain(exc: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """The :class:`MissingExtra` behind ``exc`` when the missing module is one an extra installs."""
    extra = MODULE_EXTRA.get((exc.name or "").split(".")[0])
    return MissingExtra(message(what, extra)) if extra else None

"""nbval set-up: each notebook runs in a fresh, empty ``QKIT_HOME`` on the embedded backend.

``pytest --nbval-lax notebooks/`` starts one kernel per notebook, in this
folder, when the notebook's first cell is set up; the kernel inherits this
process's environment at that moment.  So a ``pytest_runtest_setup`` hook
that runs before nbval's (``tryfirst``) prepares the environment whenever a
new notebook starts: a new temporary ``QKIT_HOME``, no variable pointing at
an external Redis or database, this checkout's ``qkit`` on ``PYTHONPATH``.
After the notebook's last cell, its embedded Redis is stopped, its folder
removed and the environment restored; the session's end catches any home
left behind (a run interrupted half-way).  Other tests in the same session
see the environment unchanged.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: variables that would point the notebooks away from the embedded default
_EXTERNAL = ("QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_DATABASE_URL",
             "QKIT_HANDLERS")
_CHANGED = (*_EXTERNAL, "QKIT_HOME", "PYTHONPATH", "MPLBACKEND")
_saved: dict[str, str | None] = {}
_homes: dict[str, Path] = {}


def _notebook_of(item: pytest.Item | None) -> pytest.Collector | None:
    parent = getattr(item, "parent", None)
    return parent if parent is not None and str(getattr(parent, "path", "")).endswith(".ipynb") else None


def _stop(home: Path) -> None:
    """Stop the home's embedded Redis (and so its watchdog), wait for it, and remove the home."""
    from qkit.backends.embedded import EmbeddedServer

    EmbeddedServer(home).stop()
    shutil.rmtree(home, ignore_errors=True)


def _restore() -> None:
    for name, value in _saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    nb = _notebook_of(item)
    if nb is None or str(nb.path) in _homes:
        return
    if not _saved:
        _saved.update({name: os.environ.get(name) for name in _CHANGED})
    home = _homes[str(nb.path)] = Path(tempfile.mkdtemp(prefix=f"qkit-nbval-{nb.path.stem}-"))
    for name in _EXTERNAL:
        os.environ.pop(name, None)
    os.environ["QKIT_HOME"] = str(home)
    # the kernel imports this checkout's qkit, whatever is installed
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), _saved["PYTHONPATH"]) if p)
    os.environ["MPLBACKEND"] = "Agg"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield  # nbval shuts the notebook's kernel down here when this was its last cell
    nb = _notebook_of(item)
    if nb is None or _notebook_of(nextitem) is nb:
        return
    home = _homes.pop(str(nb.path), None)
    if home is not None:
        _stop(home)
    _restore()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for home in list(_homes.values()):
        _stop(home)
    _homes.clear()
    _restore()

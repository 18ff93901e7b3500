"""The ledger owns the SQL: no module outside qkit/ledger/ imports SQLAlchemy or touches the ledger's engines
(docs/architecture.md#the-import-arrows).

Dev tooling (qkit/dev/) is exempt.  The one-way import
rule itself is the import-linter contract in pyproject.toml, run by scripts/test.sh; this test also
runs it, so a plain ``pytest tests/`` catches an upward import too.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QKIT = ROOT / "qkit"
#: config checks that QKIT_DATABASE_URL parses as SQLAlchemy parses it (no SQL): the one exception
URL_CHECK = {("config.py", "sqlalchemy.engine"), ("config.py", "sqlalchemy.exc")}
#: what running SQL takes: the ledger's engines and the driver's raw statements
SQL_ATTRIBUTES = {"engine", "read_engine", "durable_engine", "exec_driver_sql"}


def _sqlalchemy_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        found += [(node.lineno, n) for n in names if n == "sqlalchemy" or n.startswith("sqlalchemy.")]
    return found


def test_only_the_ledger_imports_sqlalchemy():
    offenders = []
    for path in sorted(QKIT.rglob("*.py")):
        rel = path.relative_to(QKIT)
        if rel.parts[0] in ("ledger", "dev"):
            continue
        offenders += [f"qkit/{rel}:{line} imports {name}" for line, name in _sqlalchemy_imports(path)
                      if (str(rel), name) not in URL_CHECK]
        offenders += [f"qkit/{rel}:{node.lineno} uses .{node.attr}"
                      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if isinstance(node, ast.Attribute) and node.attr in SQL_ATTRIBUTES]
    assert not offenders, "SQL belongs in qkit/ledger/:\n" + "\n".join(offenders)


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from sqlalchemy import select\n    return select\n")
    assert _sqlalchemy_imports(probe) == [(2, "sqlalchemy")]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (dev extra)")
def test_imports_run_one_way():
    out = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                              "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]

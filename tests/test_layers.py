"""The ledger owns the SQL: no module outside qkit/ledger/ imports SQLAlchemy (docs/architecture.md#imports).

Dev tooling (qkit/devservers.py, qkit/upstash_dev.py, qkit/dev/) is exempt.  The one-way import
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
DEV = {"devservers.py", "upstash_dev.py"}
#: config checks that QKIT_DATABASE_URL parses as SQLAlchemy parses it (no SQL): the one exception
URL_CHECK = {("config.py", "sqlalchemy.engine"), ("config.py", "sqlalchemy.exc")}
#: the analysis SQL still to move into qkit/ledger/ (issue 13, last step): this list only shrinks
NOT_YET_MOVED = {"analysis_queries.py", "frames.py"}


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
        if rel.parts[0] in ("ledger", "dev") or rel.name in DEV and len(rel.parts) == 1 \
                or str(rel) in NOT_YET_MOVED:
            continue
        offenders += [f"qkit/{rel}:{line} imports {name}" for line, name in _sqlalchemy_imports(path)
                      if (str(rel), name) not in URL_CHECK]
    assert not offenders, "SQL belongs in qkit/ledger/:\n" + "\n".join(offenders)


def test_the_list_of_modules_not_yet_moved_is_current():
    stale = [name for name in NOT_YET_MOVED if not (QKIT / name).is_file() or not _sqlalchemy_imports(QKIT / name)]
    assert not stale, f"moved already: take {stale} off NOT_YET_MOVED"


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

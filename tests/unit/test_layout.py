"""The package layout: runtime code never imports the dev tooling; test-only Lua stays out of the package."""
from __future__ import annotations

import ast
from pathlib import Path

import qkit

QKIT = Path(qkit.__file__).parent
TESTS = Path(__file__).resolve().parent.parent


def _imports(tree: ast.AST):
    """(module name, node, inside a function?) for every import in ``tree``."""
    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child, in_function
            elif isinstance(child, ast.ImportFrom) and child.module:
                yield child.module, child, in_function
                for alias in child.names:  # from qkit import dev
                    yield f"{child.module}.{alias.name}", child, in_function
            yield from walk(child, inner)
    yield from walk(tree, False)


def test_runtime_never_imports_the_dev_tooling():
    offenders = []
    for path in sorted(QKIT.rglob("*.py")):
        rel = path.relative_to(QKIT).as_posix()
        if rel.startswith("dev/"):
            continue
        for name, node, in_function in _imports(ast.parse(path.read_text(), rel)):
            if name == "qkit.dev" or name.startswith("qkit.dev."):
                # the CLI's `qkit dev ...` commands import it inside the command, nowhere else
                if not (rel == "cli.py" and in_function):
                    offenders.append(f"{rel}:{node.lineno} imports {name}")
    assert not offenders, offenders


def test_the_cli_imports_the_dev_endpoint_only_inside_its_command():
    tree = ast.parse((QKIT / "cli.py").read_text())
    found = [(name, inside) for name, _node, inside in _imports(tree) if name.startswith("qkit.dev")]
    assert found and all(inside for _name, inside in found), found


def test_only_runtime_lua_ships_in_the_package():
    shipped = {p.name for p in (QKIT / "lua").glob("*.lua")}
    assert {"claim.lua", "push.lua", "renew.lua", "remove.lua", "inventory.lua", "locate.lua"} <= shipped
    test_only = {p.name for p in (TESTS / "lua").glob("*.lua")}
    assert test_only and not {n.lstrip("_") for n in shipped} & test_only
    for path in (QKIT / "lua").glob("*.lua"):
        assert "test-only" not in path.read_text().splitlines()[0], path.name


def test_lua_helpers_are_written_once():
    """A shared helper is defined in one ``_*.lua`` part and spliced in by ``-- include``."""
    definitions: dict[str, list[str]] = {}
    for path in (QKIT / "lua").glob("*.lua"):
        for line in path.read_text().splitlines():
            if line.startswith("local function "):
                definitions.setdefault(line.split()[2].split("(")[0], []).append(path.name)
    assert {k: v for k, v in definitions.items() if len(v) > 1} == {}
    assert definitions["is_id"] == ["_ids.lua"] and definitions["clean_token"] == ["_ids.lua"]
    assert definitions["ready_score"] == ["_ready.lua"]

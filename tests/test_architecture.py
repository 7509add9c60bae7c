"""The structure of ``src/hubwire``: layers only point down, no import cycles, small functions.

The layers come from the import-linter contract in pyproject.toml (one source);
``lint-imports`` runs too, and this module checks the same rule on grimp's
graph itself, so each checker is shown to catch a planted violation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "hubwire"
MAX_FUNCTION_LINES = 80
MAX_HUBSERVER_LINES = 300


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


LAYERS = _layers()


def _place(module: str) -> tuple[int, str] | None:
    """(layer index, top = 0; the layer member) of a module, or None outside every layer."""
    for index, members in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + "."):
                return index, member
    return None


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("hubwire", exclude_type_checking_imports=True, cache_dir=None)


def violations(graph: grimp.ImportGraph) -> list[str]:
    """Every import from a lower layer to a higher one, or between independent siblings."""
    found = []
    for importer in sorted(graph.modules):
        here = _place(importer)
        if here is None:
            continue
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            there = _place(imported)
            if there is None:
                continue
            if there[0] < here[0] or (there[0] == here[0] and there[1] != here[1]):
                found.append(f"{importer} -> {imported}")
    return found


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.find_modules_directly_imported_by(node):
                groups.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_every_package_is_in_a_layer() -> None:
    graph = _graph()
    outside = [m for m in graph.modules if _place(m) is None and m not in ("hubwire",)]
    assert outside == [], f"modules in no layer of the contract: {outside}"


def test_layers_point_down() -> None:
    assert violations(_graph()) == []


def test_the_layer_check_catches_an_upward_import() -> None:
    graph = _graph()
    graph.add_import(importer="hubwire.connections.manager", imported="hubwire.server.app")
    graph.add_import(importer="hubwire.transports.sse", imported="hubwire.hubs.handler")
    assert violations(graph) == [
        "hubwire.connections.manager -> hubwire.server.app",
        "hubwire.transports.sse -> hubwire.hubs.handler",
    ]


def test_no_runtime_import_cycles() -> None:
    assert cycles(_graph()) == []


def test_the_cycle_check_catches_a_cycle() -> None:
    graph = _graph()
    graph.add_import(importer="hubwire.protocol.base", imported="hubwire.protocol.json_protocol")
    assert ["hubwire.protocol.base", "hubwire.protocol.json_protocol"] in cycles(graph)


def test_import_linter_contract_is_kept() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "layers only point down KEPT" in result.stdout


def _functions() -> list[tuple[str, int]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                name = f"{path.relative_to(SRC)}:{node.lineno} {node.name}"
                found.append((name, node.end_lineno - node.lineno + 1))
    return found


def test_no_function_over_80_lines() -> None:
    functions = _functions()
    assert len(functions) > 300  # the walk really saw the package
    too_long = [(name, size) for name, size in functions if size > MAX_FUNCTION_LINES]
    assert too_long == []


@pytest.mark.parametrize("module", ["server/app.py"])
def test_hub_server_stays_small(module: str) -> None:
    lines = (SRC / module).read_text().count("\n")
    assert lines <= MAX_HUBSERVER_LINES, f"{module} has {lines} lines"

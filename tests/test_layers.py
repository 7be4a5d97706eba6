"""The package's import graph: arrows point down the layers only, no cycle, no module over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "bayescl"

#: layer of each top-level part of the package, lowest first (a module may import its own layer or lower ones)
LAYERS = {
    "_checks": 0, "_batches": 0, "_params": 0,
    "gaussian": 1, "curvature": 2,
    "methods": 3,
    "lightning": 4, "avalanche": 5, "avalanche_functional": 5,
    "harness": 6,
    "__init__": 7,
}
MAX_LINES = 420


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    """Module -> the bayescl modules it imports (top-level, lazy and TYPE_CHECKING imports alike)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d] if d in stack else [n, d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_every_part_has_a_layer():
    parts = {_part(m) for m in import_graph()}
    assert parts <= set(LAYERS), f"parts without a layer: {parts - set(LAYERS)}"


def test_imports_point_down_only():
    graph = import_graph()
    up = [(m, d) for m, deps in graph.items() for d in deps
          if m != "bayescl" and LAYERS[_part(d)] > LAYERS[_part(m)]]
    assert up == [], f"upward imports: {up}"


def test_no_import_cycle():
    graph = {m: {d for d in deps if not (m.startswith(d + ".") or d == "bayescl")} for m, deps in import_graph().items()}
    assert _cycles(graph) == []


def test_the_core_imports_torch_only():
    for path in [*PKG.joinpath("gaussian").rglob("*.py"), *PKG.joinpath("curvature").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for n in names:
                assert not n.startswith(("pytorch_lightning", "lightning", "avalanche")), f"{path.name} imports {n}"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG)} has {n} lines (at most {MAX_LINES})"


def test_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: a made-up graph with a cycle and an upward arrow is caught."""
    assert _cycles({"a": {"b"}, "b": {"a"}})
    assert LAYERS[_part("bayescl.harness.bench")] > LAYERS[_part("bayescl.gaussian.diag")]

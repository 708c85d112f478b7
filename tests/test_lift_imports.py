"""The importers' modules import one way: core types and registries first, plug-ins after, no circles.

Function-level imports count too: a lazy ``from . import onnx_ops`` inside the core is a circle that
only hides until someone imports the modules in another order.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _edges(pkg: str) -> dict[str, set[str]]:
    """Module → the modules of ``pkg`` it imports anywhere in its body."""
    files = {_module(f): f for f in (ROOT / pkg.replace(".", "/")).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for mod, f in files.items():
        base = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                stem = ".".join(base[: len(base) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (stem, node.module or "") if p)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    found.add(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        edges[mod] = {m for m in found if m in files and m != mod}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_lift_modules_import_without_circles() -> None:
    edges = _edges("slimcore.lift")
    assert "slimcore.lift.onnx_ops" in edges["slimcore.lift.onnx_graph"]  # the graph is read right
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_onnx_core_imports_no_converter() -> None:
    edges = _edges("slimcore.lift")
    plugins = {"slimcore.lift.onnx_ops", "slimcore.lift.onnx_shapes", "slimcore.lift.onnx_pool",
               "slimcore.lift.onnx_reduce"}
    assert not edges["slimcore.lift.onnx_lift"] & plugins

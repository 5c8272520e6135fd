"""The package's import graph has no cycle: every import counts, at any depth of a file
(a lazy import inside a function, or one for type checking only, is still a dependency).

    python tests/test_import_graph.py    # prints the graph's layers, deepest first
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sweeper"


def modules() -> dict[str, Path]:
    """dotted name -> file, for every module of the package (a package by its name)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports. `from a.b import c` is an edge to
    `a.b.c` when that is a module, else to `a.b`; importing a module also runs its
    package's `__init__`, which is covered by the edge to the package itself only when the
    import names it."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in known else node.module)
        edges[name] = {m for m in found if m in known and m != name}
    return edges


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_a_cycle_is_found() -> None:
    """The check can fail: two modules that import each other, beside a clean chain."""
    edges = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"c"}}
    assert cycles(edges) == [["a", "b"]]


def test_the_graph_sees_lazy_and_type_checking_imports() -> None:
    edges = graph()
    assert "sweeper.search.study" in edges["sweeper.cli"]  # imported inside a command
    assert "sweeper.keys" in edges["sweeper.fleet.heartbeat"]


if __name__ == "__main__":
    edges = graph()
    depth: dict[str, int] = {}

    def level(m: str) -> int:
        if m not in depth:
            depth[m] = 0
            depth[m] = 1 + max((level(d) for d in edges[m]), default=-1)
        return depth[m]

    for m in sorted(edges, key=lambda m: (level(m), m)):
        print(f"{level(m):2d} {m}")
    print("cycles:", cycles(edges) or "none")

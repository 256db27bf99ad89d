"""The house has no import circles and no oversized rooms.

The import graph of `hybridprune/` and `benchmarks/` is read with `ast` (module-level and function-level
imports alike: a lazy import is still an arrow); any cycle fails, and so does a module of `hybridprune/`
over MAX_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 500
OVER_THE_LIMIT: set[str] = set()
"""Modules still over MAX_LINES while they are being split; the test fails as soon as one of them fits (take it out
of this set then) and for any other module over the limit."""


def module_names(root: Path, package: str | None) -> dict[str, Path]:
    """Dotted module name -> file, for a package (`hybridprune`) or a folder of scripts (`benchmarks`, whose
    scripts import each other by bare name with the folder on sys.path)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if package is None:
            if len(parts) > 1:  # scripts in sub-folders import their own neighbours
                parts = [*path.parent.relative_to(root).parts, parts[-1]]
            name = ".".join(parts)
        else:
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
        names[name] = path
    return names


def imported(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module name that `path` (module `name`) imports anywhere in its body."""
    found: set[str] = set()
    base = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                module = node.module or ""
            # `from pkg import name`: the module pkg.name when there is one, else pkg (resolved by the caller)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {**module_names(REPO / "hybridprune", "hybridprune"), **module_names(REPO / "benchmarks", None)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target in imported(path, name, path.name == "__init__.py"):
            # an import of a.b.c runs a and a.b too, but a package importing its own children is not a circle:
            # count the deepest known module only
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg import a\n")
    modules = module_names(tmp_path / "pkg", "pkg")
    graph = {name: {t.rpartition(".")[0] if t not in modules else t
                    for t in imported(path, name, path.name == "__init__.py")} - {name}
             for name, path in modules.items()}
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_the_line_limit():
    long = {str(path.relative_to(REPO)): n for path in sorted((REPO / "hybridprune").rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= OVER_THE_LIMIT, f"modules over {MAX_LINES} lines: {long}"
    assert OVER_THE_LIMIT <= set(long), f"back under {MAX_LINES} lines, take them out of OVER_THE_LIMIT: {OVER_THE_LIMIT - set(long)}"

"""The package's import graph has no cycles, function-level imports included (they hide a cycle from Python but
not from a reader). Read with `ast` only: nothing is imported, so this runs in well under a second.

    python -m pytest -q tests/test_architecture.py     # or: python tests/test_architecture.py
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "crossrank"
MAX_MODULE_LINES = 500
MAX_LAYERS = 6  # the longest import chain (entry point -> ... -> errors); it was 7 in the flat layout


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name relative to it (`data.runs`, `config`); `__init__`/`__main__`
    files are named by their folder (`data`) or `<folder>.__main__`."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names[".".join(parts)] = path
    return names


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The crossrank modules one file imports, at any depth of its code (`from crossrank.x.y import ...`,
    `import crossrank.x`, `from crossrank.x import y` where y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "crossrank":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:
                child = f"{base}.{alias.name}" if base else alias.name
                found.add(child if child in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("crossrank.")}
    return found & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted: one per cycle knot."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_cycle_finder_sees_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("from crossrank.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from crossrank import a\n")
    (tmp_path / "c.py").write_text("import crossrank.a\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "sub" / "d.py").write_text("from crossrank.sub import e\nfrom crossrank import c\n")
    (tmp_path / "sub" / "e.py").write_text("def g():\n    from crossrank.sub.d import x\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}, "sub": set(), "sub.d": {"sub.e", "c"}, "sub.e": {"sub.d"}}
    assert cycles(graph) == [["a", "b"], ["sub.d", "sub.e"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == [], "import cycles in crossrank/"


def layers(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain of an acyclic graph, first importer first."""
    best: dict[str, list[str]] = {}

    def chain(node: str) -> list[str]:
        if node not in best:
            best[node] = [node] + max((chain(m) for m in sorted(graph[node])), key=len, default=[])
        return best[node]

    return max((chain(n) for n in sorted(graph)), key=len, default=[])


def test_layer_count_sees_the_longest_chain():
    assert layers({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"c"}}) == ["a", "b", "c"]


def test_import_graph_stays_shallow():
    chain = layers(import_graph())
    assert len(chain) <= MAX_LAYERS, " -> ".join(chain)


def test_every_module_is_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_names().items()}
    assert {name: n for name, n in sizes.items() if n >= MAX_MODULE_LINES} == {}


if __name__ == "__main__":
    print(cycles(import_graph()) or "no import cycles")
    print("longest import chain:", " -> ".join(layers(import_graph())))

"""The package's import graph has no cycles, function-level imports included (they hide a cycle from Python but
not from a reader). Read with `ast` only: nothing is imported, so this runs in well under a second.

    python -m pytest -q tests/test_architecture.py     # or: python tests/test_architecture.py
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "crossrank"

# Cycles another change is removing (name them here only with the issue that removes them): preprocessing <->
# teacher is issue 14's teacher split (read_run_blocks / parse_permutation). Delete the entry when it is gone.
KNOWN_CYCLES: set[frozenset[str]] = set()


def imports_of(path: Path) -> set[str]:
    """The crossrank modules one file imports, at any depth of its code (`from crossrank.x import ...`,
    `import crossrank.x`, `from crossrank import x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "crossrank":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crossrank."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("crossrank.")}
    return found - {path.stem}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {p.stem: p for p in package.glob("*.py")}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


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
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    new = [c for c in found if frozenset(c) not in KNOWN_CYCLES]
    assert new == [], f"import cycles in crossrank/: {new}"
    gone = [sorted(k) for k in KNOWN_CYCLES if list(sorted(k)) not in found]
    assert gone == [], f"no longer cycles: delete {gone} from KNOWN_CYCLES in tests/test_architecture.py"


if __name__ == "__main__":
    print(cycles(import_graph()) or "no import cycles")

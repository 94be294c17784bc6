"""The longest chain of heal_pl's internal imports, read statically (no heal_pl module is imported).

    python scripts/import_chain.py            # prints the chain, one module a line, and its length in modules

The graph: one node per module under ``heal_pl/`` (a package's ``__init__.py`` is the module ``heal_pl.x``); an
edge ``a -> b`` for each import of a heal_pl module among ``a``'s module-level statements, i.e. those run when ``a``
is imported: top-level ``import`` / ``from ... import`` and those nested in top-level ``if`` / ``try`` / ``with``
blocks, but not inside functions or classes, nor under ``if TYPE_CHECKING:``. ``from heal_pl.x import y`` is an edge
to ``heal_pl.x.y`` when that is a module, else to ``heal_pl.x``; ``import heal_pl.x.y`` is an edge to ``heal_pl.x.y``.
The parent packages Python imports on the way (``heal_pl``, ``heal_pl.x``) are not counted as edges.

The length of a chain is the number of modules in it (``a -> b -> c`` has length 3), the longest simple one over
the whole graph.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "heal_pl"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements run at import time: not in functions or classes, not under ``if TYPE_CHECKING``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the heal_pl modules it imports at module level."""
    files = {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in _module_level(ast.parse(path.read_text(encoding="utf-8"), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                src = _absolute(node, name, path.name == "__init__.py")
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest simple path (in modules); ties go to the alphabetically first chain."""
    if _has_cycle(graph):
        return _longest_by_search(graph)

    @cache
    def from_(node: str) -> tuple[str, ...]:
        tails = [from_(n) for n in sorted(graph[node])]
        return (node, *max(tails, key=len, default=()))

    return list(max((from_(n) for n in sorted(graph)), key=len))


def _has_cycle(graph: dict[str, set[str]]) -> bool:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str) -> bool:
        state[node] = 1
        for n in graph[node]:
            if state.get(n) == 1 or (n not in state and visit(n)):
                return True
        state[node] = 2
        return False

    return any(n not in state and visit(n) for n in sorted(graph))


def _longest_by_search(graph: dict[str, set[str]]) -> list[str]:
    """Exhaustive search for a graph with import cycles (exponential in general; heal_pl's graph is small)."""
    best: list[str] = []

    def walk(path: list[str]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for n in sorted(graph[path[-1]]):
            if n not in path:
                path.append(n)
                walk(path)
                path.pop()

    for start in sorted(graph):
        walk([start])
    return best


def main() -> int:
    graph = import_graph()
    chain = longest_chain(graph)
    cycle = " (the graph has import cycles)" if _has_cycle(graph) else ""
    print("\n  -> ".join(chain))
    print(f"longest import chain: {len(chain)} modules{cycle}; {len(graph)} modules in heal_pl")
    return 0


if __name__ == "__main__":
    sys.exit(main())

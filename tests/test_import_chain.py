"""heal_pl's longest internal import chain (scripts/import_chain.py, read statically) has at most 8 modules.

What is counted: the modules in the chain, both ends included (``a -> b -> c`` is 3, not the 2 edges), over the
graph of module-level heal_pl imports — a package's ``__init__`` is a module of its own; imports inside functions
or under ``if TYPE_CHECKING:`` are not edges; ``from heal_pl.x import y`` is an edge to ``heal_pl.x.y`` when that
is a module, else to ``heal_pl.x``. A longer chain means a low-level module reaches up (data importing the Lightning
datamodule for a path, a cache helper living in generation): move the import where it belongs.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from import_chain import import_graph, longest_chain  # noqa: E402

MAX_MODULES = 8


def test_longest_import_chain_has_at_most_8_modules() -> None:
    graph = import_graph()
    assert "heal_pl.barrier.kl" in graph and "heal_pl.survival" in graph  # the graph covers the package
    chain = longest_chain(graph)
    assert len(chain) <= MAX_MODULES, f"{len(chain)} modules: " + " -> ".join(chain)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "heal_pl" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_edges_follow_the_stated_rules(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "from heal_pl.a.b import thing\n",
        "a/b.py": "from heal_pl.a import c\nfrom heal_pl import d\n",  # c: a module; d: a module of the root package
        "a/c.py": "def f():\n    from heal_pl import e\n",  # function-local: no edge
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import heal_pl.e\nimport heal_pl.a.c\n",
        "e.py": "from heal_pl.a import nothing_here\n",  # not a module: the edge goes to the package
    })  # fmt: skip
    graph = import_graph(root)
    assert graph == {
        "heal_pl": set(),
        "heal_pl.a": {"heal_pl.a.b"},
        "heal_pl.a.b": {"heal_pl.a.c", "heal_pl.d"},
        "heal_pl.a.c": set(),
        "heal_pl.d": {"heal_pl.a.c"},
        "heal_pl.e": {"heal_pl.a"},
    }
    assert longest_chain(graph) == ["heal_pl.e", "heal_pl.a", "heal_pl.a.b", "heal_pl.d", "heal_pl.a.c"]


def test_a_cycle_still_gives_the_longest_simple_chain() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert longest_chain(graph) == ["a", "b", "c", "d"]

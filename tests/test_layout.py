"""The layout follows the data flow: every module imports, the import graph has no cycle, and the
drawing code reaches neither the model nor the training stack.

The graph is read from the source (AST), so it covers imports inside functions as well as at module
level; imports under `if TYPE_CHECKING:` are left out because they never run. Importing `a.b.c` runs
`a/__init__.py` and `a/b/__init__.py` first, so those edges are in the graph too.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import protoquant

PACKAGE = Path(protoquant.__file__).parent
FORBIDDEN_FOR_RENDER = ("protoquant.model", "protoquant.train", "protoquant.pipeline", "protoquant.cache")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST) -> list[str]:
    """Every protoquant module an AST imports at run time (TYPE_CHECKING blocks skipped)."""
    found: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]  # submodules imported by name
        stack.extend(ast.iter_child_nodes(node))
    return [name for name in found if name in MODULES]


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {
            parent
            for imported in _imported(ast.parse(path.read_text()))
            for parent in _with_parents(imported)
        }
        own_parents = set(_with_parents(name))
        graph[name] = {
            t for t in targets if t not in own_parents
        }  # a package's own __init__ runs first anyway
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for target in graph.get(node, ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_render_reaches_neither_model_nor_training():
    graph = import_graph()
    for name in (n for n in MODULES if n.startswith("protoquant.render")):
        bad = sorted(t for t in reachable(graph, name) if t.startswith(FORBIDDEN_FOR_RENDER))
        assert not bad, f"{name} reaches {bad}"


def test_render_import_loads_no_model_code():
    """The same fact, observed: importing the drawing package in a fresh interpreter."""
    code = (
        "import sys, protoquant.render; "
        f"bad = sorted(m for m in sys.modules if m.startswith({FORBIDDEN_FOR_RENDER!r})); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_layers_import_downwards_only():
    """Lower layers never import the apps, and the data / backbone / cache layers never import stages."""
    graph = import_graph()
    apps = ("protoquant.cli", "protoquant.demo", "protoquant.pipeline", "protoquant.__main__")
    for name, targets in graph.items():
        if name in apps or name.startswith("protoquant.cli.") or name == "protoquant":  # cli/: a package
            continue
        assert not [t for t in targets if t in apps], f"{name} imports an app: {targets}"
    low = ("protoquant.data", "protoquant.backbones", "protoquant.cache", "protoquant.config")
    high = (
        "protoquant.train",
        "protoquant.model",
        "protoquant.explain",
        "protoquant.metrics",
        "protoquant.render",
    )
    for name, targets in graph.items():
        if name.startswith(low):
            assert not [t for t in targets if t.startswith(high)], f"{name} imports upwards: {targets}"

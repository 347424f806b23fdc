"""The product's import graph, read from the AST: no circles, and no HTTP layer reaches the result store.

Every import statement counts, wherever it is (module level, a function, an ``if TYPE_CHECKING:``
block): a circle broken only by importing late is still a circle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "structure_api"
# The layers that speak HTTP and read answers: they must not know about keeping results.
HTTP_LAYERS = ("structure_api.client", "structure_api.transport", "structure_api.answers")
STORE_MODULES = ("structure_api.store", "structure_api.store_disk", "structure_api.paid")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(path): path for path in (REPO / PACKAGE).rglob("*.py")}
    found["nodes"] = REPO / "nodes.py"
    found["server_routes"] = REPO / "server_routes.py"
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name an import statement names (``from ..x import y`` in ``a.b.c`` -> ``a.x``)."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each product module -> the product modules it imports (a name imported from a package that is a
    submodule counts as that submodule)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                # "import a.b.c" imports a.b.c; keep the longest product module it names.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


GRAPH = import_graph(_modules())


def test_the_graph_is_read() -> None:
    # The reader must see the real edges, or the tests below could pass on an empty graph.
    assert "structure_api.transport" in GRAPH["structure_api.client"]
    assert "structure_api.images" in GRAPH["structure_api.request"]
    assert "structure_api.standin.handler" in GRAPH["structure_api.standin.server"]
    assert "structure_api.standin" in GRAPH["structure_api.cli.target"]  # an import inside a function counts


def test_an_import_of_the_package_root_counts(tmp_path) -> None:
    # transport.py once took __version__ from the package root, whose __init__ imports the client.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .client import Client\n__version__ = '1'\n")
    (tmp_path / "pkg" / "client.py").write_text("def f():\n    from . import __version__\n")
    graph = import_graph(
        {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.client": tmp_path / "pkg" / "client.py"}
    )
    assert find_cycles(graph) == [["pkg", "pkg.client"]]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    cycles = find_cycles(GRAPH)
    assert cycles == [], f"import circles among product modules: {cycles}"


@pytest.mark.parametrize("layer", HTTP_LAYERS)
def test_no_http_layer_imports_the_store(layer: str) -> None:
    reached = reachable(GRAPH, layer)
    assert not reached & set(STORE_MODULES), (
        f"{layer} reaches {sorted(reached & set(STORE_MODULES))}: HTTP must not know the result store"
    )

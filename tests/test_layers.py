"""The library's modules import each other without cycles (the layer contract itself is ``lint-imports``).

The import graph is built from the source with :mod:`ast` (no module is imported) and checked with networkx:

* module-level imports (what Python executes on ``import``) form no cycle;
* adding the imports made inside functions still forms no cycle, so no function-level import exists only to
  dodge one (those that remain keep torch out of ``cimc --help`` or load an optional package on use).

Imports under ``if TYPE_CHECKING:`` never run and are left out. The package's own ``cimc/__init__.py`` is left
out of the second check: it imports the API on first attribute access (PEP 562), and every submodule imports
the package first anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Import name -> source folder (pyproject.toml's package-dir).
PACKAGES = {"cimc": ROOT / "cimc", "cimc.passes": ROOT / "passes", "cimc.targets": ROOT / "targets",
            "cimc.runtime": ROOT / "runtime", "cimc.builtin": ROOT / "cimc" / "builtin"}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.glob("*.py")):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _targets(module: str, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """The cimc modules an import statement loads (``from a import b`` loads ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            parts = module.split(".") if mods[module].name == "__init__.py" else module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    found = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def import_graphs() -> tuple[nx.DiGraph, nx.DiGraph]:
    """(module-level graph, graph with the function-level imports added), nodes named as imported."""
    mods = _modules()
    top, full = nx.DiGraph(), nx.DiGraph()
    top.add_nodes_from(mods)
    full.add_nodes_from(mods)

    def walk(module: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for grand in child.orelse:  # the else branch runs
                    walk(module, grand, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, child, mods):
                    full.add_edge(module, target)
                    if not in_function:
                        top.add_edge(module, target)
            walk(module, child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for module, path in mods.items():
        walk(module, ast.parse(path.read_text(encoding="utf-8")), False)
    return top, full


def _cycles(graph: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]


def test_module_level_imports_have_no_cycle() -> None:
    top, _ = import_graphs()
    assert len(top) > 40, "the source folders were not found"
    assert _cycles(top) == []


def test_no_function_level_import_dodges_a_cycle() -> None:
    _, full = import_graphs()
    full.remove_node("cimc")
    cycles = _cycles(full)
    # Name one edge of each cycle so the message says where to cut.
    detail = [sorted(full.subgraph(c).edges) for c in cycles]
    assert cycles == [], f"import cycles through function-level imports: {detail}"


@pytest.mark.parametrize("low, high", [("cimc.runtime", "cimc.passes"), ("cimc.targets", "cimc.runtime")])
def test_the_graph_sees_the_layers(low: str, high: str) -> None:
    """The walk resolves the package-dir layout: passes import the runtime, the runtime imports targets."""
    top, _ = import_graphs()
    assert any(a.startswith(high) and b.startswith(low) for a, b in top.edges)

"""The package's import graph: no cycles, no upward imports, function-level imports only where allowed.

The layers, bottom to top (docs/architecture.md):

    foundation -> format -> codecs -> container -> checkpoint/report -> tasks/inspection
    -> methods (lossless, quant, posterior, diverge) -> rec, prune -> api -> cli

A module may import its own unit (package or top-level module) or any unit in a lower layer;
never a unit in its own layer or above. Imports inside functions count as edges too, and are
allowed only in ``api`` and ``cli`` (start-up cost: they keep ``import torch`` off ``--help``,
``inspect`` and usage errors) and for optional extras.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlcompress"

LAYERS: list[set[str]] = [
    {"errors", "lazy", "progress", "version"},
    {"atomic", "device", "distributed", "selection", "workers"},
    {"format"},
    {"codecs"},
    {"container", "options"},
    {"report", "checkpoint"},
    {"inspection", "assembly", "tasks"},
    {"lossless", "quant", "posterior", "divergence"},
    {"rec", "prune"},
    {"api"},
    {"", "cli"},  # "" is the package's __init__: it re-exports the api
    {"__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
#: Units whose functions may import (start-up cost, measured in docs/architecture.md).
LAZY_IMPORTERS = {"api", "cli"}
#: Third-party extras a function may import on demand.
OPTIONAL = {"transformers", "tokenizers", "matplotlib", "sklearn"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from mlcompress.codecs import entropy` imports the submodule entropy; a name that is
            # not a submodule comes from the package's __init__ itself.
            submodules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            names = submodules + ([base] if len(submodules) < len(node.names) else [])
        for name in names:
            found.append((name, id(node) in in_function, node.lineno))
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, list[tuple[str, bool, int]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _graph()}
    assert units <= set(RANK), f"modules outside the layer map: {sorted(units - set(RANK))}"


def test_no_upward_or_sideways_imports():
    bad = []
    for module, imports in _graph().items():
        for target, _, line in imports:
            if not target.startswith("mlcompress") or _unit(target) == _unit(module):
                continue
            if target == "mlcompress" and _unit(module) != "":
                bad.append(f"{module}:{line} imports the package root (import from its module instead)")
            elif RANK[_unit(target)] >= RANK[_unit(module)]:
                bad.append(f"{module}:{line} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imports if t in _graph_modules()} - {m} for m, imports in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            # A package importing its own submodules (its __init__ re-exporting them) is not a cycle
            # unless a submodule imports the package back.
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _graph_modules() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("*.py")}


def test_function_level_imports_only_where_allowed():
    bad = []
    for module, imports in _graph().items():
        for target, inside, line in imports:
            if not inside:
                continue
            if target.split(".")[0] in OPTIONAL or _unit(module) in LAZY_IMPORTERS:
                continue
            bad.append(f"{module}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["mlcompress", "mlcompress.cli", "mlcompress.container", "mlcompress.inspection"])
def test_light_modules_do_not_import_torch_or_numpy(module):
    """``--help``, ``inspect`` and usage errors must not pay for ``import torch`` (2-3 s)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing {module} imported {out}"

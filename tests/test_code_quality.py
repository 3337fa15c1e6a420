"""The package's shape, checked: layers (import-linter), no import cycle, ruff format and lint.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``, ``[tool.ruff]``) and are
described in ``docs/architecture.md``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "drm_lightning"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: it is part of the test extras (pip install -e '.[test]')"
        )
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept() -> None:
    proc = _run(_tool("lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan), imports inside functions too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start) & modules)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    imported = graph.find_modules_directly_imported_by(child) & modules
                    work.append((child, iter(sorted(imported))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph("drm_lightning", exclude_type_checking_imports=True)
    # A package's __init__ re-exporting its own modules is not a cycle of the code's design.
    packages = {m for m in graph.modules if (PACKAGE.parent / m.replace(".", "/")).is_dir()}
    for package in packages:
        for module in graph.find_modules_directly_imported_by(package):
            if module.startswith(package + "."):
                graph.remove_import(importer=package, imported=module)
    cycles = _cycles(graph, set(graph.modules))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_package_root_holds_only_init() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py"], f"modules at the package root: {modules}"


def test_ruff_format_is_clean() -> None:
    proc = _run(_tool("ruff"), "format", "--check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_check_is_clean() -> None:
    proc = _run(_tool("ruff"), "check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

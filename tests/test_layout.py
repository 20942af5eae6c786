"""The layout's import rules: no import cycle between the top-level packages, no upward imports (models below
lightning_modules below the `ardiff` CLI; callbacks / datamodules / models / lightning_modules never import the CLI;
benchmarks never import tests), and every package imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ardiff", "models", "lightning_modules", "datamodules", "callbacks")
SCANNED = (*PACKAGES, "benchmarks", "tests")

FORBIDDEN = {
    "models": {"lightning_modules", "datamodules", "callbacks", "ardiff", "lightning", "pytorch_lightning"},
    "lightning_modules": {"ardiff", "callbacks"},
    "datamodules": {"ardiff", "callbacks"},
    "callbacks": {"ardiff", "lightning_modules"},
    "benchmarks": {"tests"},
}
# knots being untied: left out of the cycle check and pinned by test_pending_knots_are_untied (empty: none left)
PENDING: set[tuple[str, str]] = set()


def package_imports(top: str, root: Path = ROOT) -> dict[str, set[str]]:
    """imported top-level module -> files of `top` importing it (absolute imports, also inside functions)."""
    found: dict[str, set[str]] = {}
    for path in sorted((root / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(root)))
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    """package -> {other scanned package it imports -> files}."""
    graph = {}
    for top in SCANNED:
        imports = package_imports(top)
        graph[top] = {other: files for other, files in imports.items() if other in SCANNED and other != top}
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_on_known_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_no_import_cycle_between_packages():
    graph = import_graph()
    edges = {a: {b for b in deps if (a, b) not in PENDING} for a, deps in graph.items()}
    cycle = find_cycle(edges)
    assert cycle is None, (
        "package import cycle "
        + " -> ".join(cycle)
        + "; "
        + "; ".join(f"{a} -> {b} in {sorted(graph[a][b])}" for a, b in zip(cycle, cycle[1:], strict=False))
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    imports = package_imports(package)
    bad = {m: sorted(f) for m, f in imports.items() if m in FORBIDDEN[package] and (package, m) not in PENDING}
    assert not bad, f"{package} must not import {sorted(bad)}: {bad}"


def test_pending_knots_are_untied():
    graph = import_graph()
    assert not [(a, b, sorted(graph[a][b])) for a, b in PENDING if b in graph[a]]


@pytest.mark.slow  # five fresh interpreters each import torch + lightning: ~15 s of CPU on 2 idle cores
def test_every_package_imports_alone_in_a_fresh_interpreter():
    """Each package, then each of its modules, imported first in a new process: a cycle that only import order
    hides fails here."""
    script = (
        "import importlib, pkgutil, sys\n"
        "pkg = importlib.import_module(sys.argv[1])\n"
        "for m in sorted(pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'), key=lambda m: m.name):\n"
        "    importlib.import_module(m.name)\n"
    )
    procs = {  # in parallel: each pays the torch / lightning import once
        package: subprocess.Popen([sys.executable, "-c", script, package], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for package in PACKAGES
    }
    for package, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"import {package}: {err[-2000:]}"

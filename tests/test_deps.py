"""Declared dependencies = imported dependencies: every third-party module the package imports is in pyproject's
[project].dependencies, and every declared distribution is imported (or named below with the reason it is needed
without an import)."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

from tests.test_layout import package_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ardiff", "models", "lightning_modules", "datamodules", "callbacks")  # what pyproject installs

# declared, needed at run time, never imported by our code
RUNTIME_ONLY = {
    "omegaconf": "jsonargparse's omegaconf+ parser mode (ardiff/cli.py) imports it to resolve ${...} in recipes",
    "tensorboard": "the writer behind Lightning's default TensorBoardLogger",
}
# declared but allowed to be unimported while code that uses it is in flight (empty: everything declared is imported)
PENDING: set[str] = set()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """top-level module -> files importing it, for every absolute import (also inside functions) of the package."""
    found: dict[str, set[str]] = {}
    for pkg in packages:
        for name, files in package_imports(pkg, ROOT).items():
            found.setdefault(name, set()).update(files)
    return found


def third_party_distributions(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """distribution (normalized) -> files importing it; stdlib and first-party modules left out."""
    dists = md.packages_distributions()
    out: dict[str, set[str]] = {}
    for module, files in modules.items():
        if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
            continue
        assert module in dists, f"{module!r} (imported by {sorted(files)}) belongs to no installed distribution"
        for dist in dists[module]:
            out.setdefault(normalize(dist), set()).update(files)
    return out


def declared_distributions() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {normalize(re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0]) for dep in deps}


def test_declared_dependencies_equal_imported_ones():
    imported = third_party_distributions(imported_modules())
    declared = declared_distributions()
    undeclared = {d: sorted(f) for d, f in imported.items() if d not in declared}
    assert not undeclared, f"imported but not in pyproject.toml [project].dependencies: {undeclared}"
    missing = sorted((set(RUNTIME_ONLY) | PENDING) - declared)
    assert not missing, f"needed at run time but not in pyproject.toml: {missing}"
    unused = declared - set(imported) - set(RUNTIME_ONLY) - PENDING
    assert not unused, f"declared in pyproject.toml but never imported by {PACKAGES}: {sorted(unused)}"


def test_the_scan_sees_function_level_and_dotted_imports(tmp_path):
    """The scanner is not fooled by imports inside functions or `from a.b import c` (independent small sample)."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    source = "import os\ndef f():\n    import yaml\nfrom torch.nn import functional\nfrom . import x\n"
    (pkg / "m.py").write_text(source)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        modules = imported_modules(("fakepkg",))
    finally:
        ROOT = saved
    assert set(modules) == {"os", "yaml", "torch"}
    assert set(third_party_distributions(modules)) == {"pyyaml", "torch"}

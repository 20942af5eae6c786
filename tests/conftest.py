"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A `DemoDataModule` root with the default demo data already written (shared by the whole session)."""
    from datamodules.demo import demo_subdir, make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / demo_subdir(10, 32, 500, 50, 0), progress=False)
    return root

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


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """A randomly initialised Inception weights file with torch-fidelity's real key names."""
    from tests.test_eval_common import make_random_inception_weights

    return make_random_inception_weights(tmp_path_factory.getbasetemp() / "random_inception.pth")


@pytest.fixture
def fast_inception(monkeypatch):
    """Resize to 75 px instead of 299 inside Inception (16x cheaper on CPU); comparisons stay exact."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)

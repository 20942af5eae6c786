"""Fakes shared by the tests and the benchmarks (benchmarks never import tests): stand-ins for weights that cannot
be downloaded here."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import nn


def make_random_inception_weights(path: Path) -> str:
    """Save randomly initialised weights with torch-fidelity's real key names (its loading bypassed); the conv
    weights are He-initialised so that features do not vanish through the 90+ layers."""
    if not path.exists():
        no_load = mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), no_load:
            model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    fan_in = m.weight[0].numel()
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
        torch.save(model.state_dict(), str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return str(path)

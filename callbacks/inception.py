"""Inception-v3 feature extractor for FID/IS: torch-fidelity's TF-compatible port, with offline-friendly weights lookup.

Weights are torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the 2015-12-05 TF graph used by the ADM
suite). Lookup order: explicit path > $ARDIFF_INCEPTION_WEIGHTS > torch hub cache > download. Whatever the source,
the file is read with the safe loader (`weights_only`, tensors only) before torch-fidelity sees it: torch-fidelity
itself unpickles with `weights_only=False`, which would run code hidden in a crafted file.
"""

import io
import os
import urllib.error

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from models.checkpoint import CheckpointError, safe_torch_load

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "ARDIFF_INCEPTION_WEIGHTS"
INCEPTION_FEATURES = ("2048", "logits_unbiased")  # pool_3 for FID/PR, bias-free logits for IS (as ADM/torch-fidelity)


def hub_cache_path() -> str:
    """Where torch.hub (and torch-fidelity) cache the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)


def _missing(where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights '{INCEPTION_WEIGHTS_FILE}' not found {where}. Download it from {URL_INCEPTION_V3} "
        f"and either pass its path explicitly (inception_weights=... / --inception-weights), set "
        f"${INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILE}, or place it at {hub_cache_path()}."
    )


def resolve_inception_weights(path: str | None = None, download: bool = True) -> str:
    """Return a local path to the Inception weights, downloading into the hub cache only as the last resort."""
    if path:
        if not os.path.isfile(path):
            raise _missing(f"at the explicitly given path '{path}'")
        return path
    env_path = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env_path:
        if not os.path.isfile(env_path):
            raise _missing(f"at ${INCEPTION_WEIGHTS_ENV}='{env_path}'")
        return env_path
    cached = hub_cache_path()
    if os.path.isfile(cached):
        return cached
    if not download:
        raise _missing("(downloading disabled)")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, cached, progress=False)  # atomic: temp file + rename
    except (urllib.error.URLError, OSError) as e:
        raise _missing(f"locally, and downloading failed ({e})") from e
    return cached


def load_inception_state_dict(path: str) -> dict[str, Tensor]:
    """The Inception state dict of `path`, read without executing code: tensors only, else `CheckpointError`."""
    state = safe_torch_load(path)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise CheckpointError(
            f"Inception weights {path!r} are not a state dict of tensors (got {type(state).__name__}); "
            f"use torch-fidelity's {INCEPTION_WEIGHTS_FILE} ({URL_INCEPTION_V3})"
        )
    return dict(state)


def build_inception(weights: str | None = None, download: bool = True) -> FeatureExtractorInceptionV3:
    """torch-fidelity's extractor: uint8 input, TF1-compatible resize to 299 -> ('2048', 'logits_unbiased')."""
    path = resolve_inception_weights(weights, download=download)
    state = load_inception_state_dict(path)
    # torch-fidelity only takes a path (which it unpickles unsafely): hand it an in-memory copy of the vetted tensors
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    features = list(INCEPTION_FEATURES)
    return FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=buffer)


@torch.no_grad()
def extract_features(inception: FeatureExtractorInceptionV3, images: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
    """uint8 images (N,3,H,W) on any device -> {'pool': (N,2048), 'logits': (N,1008)} float32 on the images' device."""
    assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3, images.shape
    device = next(inception.parameters()).device
    pools = [torch.zeros(0, 2048, device=images.device)]
    logits = [torch.zeros(0, inception.fc.out_features, device=images.device)]
    for batch in images.split(batch_size):
        pool, logit = inception(batch.to(device))  # (b, 2048), (b, 1008)
        pools.append(pool.to(images.device))
        logits.append(logit.to(images.device))
    return {"pool": torch.cat(pools), "logits": torch.cat(logits)}

"""Fakes shared by the evaluation tests (a tiny generator, random Inception weights), and unit tests of the sample
plan and of the Inception weights lookup."""

import json
import os
import urllib.error
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from callbacks.inception import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, resolve_inception_weights
from callbacks.sampling import SamplePlan

torch.set_num_threads(2)


class FakeGenerator(L.LightningModule):
    """Implements the sampling interface of docs/CONTRACT.md: (label, noise from the generator) -> image in [-1, 1].

    `dummy` is the only trained parameter and sampling does not use it, so samples do not change during a fit.
    With `record_dir`, every `sample_images` call appends {rank, seed, labels} to `<record_dir>/rank<r>.jsonl`.
    """

    def __init__(self, num_classes: int = 4, image_size: int = 16, record_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes, self.image_size, self.record_dir = num_classes, image_size, record_dir
        gen = torch.Generator().manual_seed(0)  # identical weights in every process
        self.embed = nn.Embedding(num_classes, 3)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
        with torch.no_grad():
            for p in [*self.embed.parameters(), *self.net.parameters()]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.dummy = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def sample_images(self, labels: Tensor, generator: torch.Generator | None = None, temperature: float = 1.0):
        s = self.image_size
        noise = torch.randn(labels.shape[0], 3, s, s, generator=generator).to(self.device)  # (B, 3, s, s)
        x = temperature * noise + 2 * self.embed(labels)[:, :, None, None]
        if self.record_dir:
            seed = generator.initial_seed() if generator is not None else None
            with open(os.path.join(self.record_dir, f"rank{self.global_rank}.jsonl"), "a") as f:
                f.write(json.dumps({"seed": seed, "labels": labels.tolist()}) + "\n")
        return torch.tanh(self.net(x))  # (B, 3, s, s)

    def training_step(self, batch, batch_idx):
        return ((self.dummy - 1) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        return None

    def test_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD([self.dummy], lr=0.1)


def dummy_loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=2)


class UInt8Images(Dataset):
    """(N,3,H,W) uint8 tensor as the per-image dataset torch-fidelity accepts."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def smooth_images(n: int, size: int, seed: int) -> Tensor:
    """n random low-frequency uint8 images (n, 3, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    return (nn.functional.interpolate(low, size=size, mode="bilinear") * 255).round().to(torch.uint8)


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


def shrink_inception_input() -> None:
    """Resize to 75 px (the smallest input Inception-v3 accepts) instead of 299 in this process: 16x cheaper on CPU.
    torch-fidelity and ardiff use the same class, so comparisons between them stay exact."""
    tf_inception.FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = 75


# ---------------------------------------------------------------- sample plan
def test_sample_plan_is_class_balanced_and_independent_of_world_size():
    plan = SamplePlan(num_samples=20, num_classes=4, chunk_size=6, seed=3)
    labels = plan.labels(torch.arange(20))
    assert labels.tolist() == [c for c in range(4) for _ in range(5)]  # MAR: np.arange(C).repeat(N // C)
    assert plan.num_chunks == 4 and plan.chunk_labels(3).tolist() == [3] * 6  # last chunk: 2 valid + 4 padding
    assert plan.chunk_indices(3).tolist() == [18, 19]
    for world in (1, 2, 3, 5):
        dealt = sorted(k for r in range(world) for k in plan.rank_chunks(r, world))
        assert dealt == list(range(4))  # every chunk exactly once
        assert all(len(plan.rank_chunks(r, world)) <= plan.calls_per_rank(world) for r in range(world))
    assert plan.generator(2).initial_seed() == 5
    uneven = SamplePlan(num_samples=10, num_classes=4, chunk_size=4).labels(torch.arange(10))
    assert torch.bincount(uneven).tolist() == [3, 2, 3, 2]  # as balanced as possible when C does not divide N


# ---------------------------------------------------------------- weights lookup
@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def test_weights_lookup_order(clean_env, monkeypatch):
    explicit, env = clean_env / "a.pth", clean_env / "b.pth"
    cache = clean_env / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    for p in (explicit, env, cache):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(env))
    assert resolve_inception_weights(str(explicit)) == str(explicit)
    assert resolve_inception_weights(None) == str(env)
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    assert resolve_inception_weights(None, download=False) == str(cache)


def test_missing_weights_error_names_file_and_places(clean_env, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        resolve_inception_weights(None, download=False)
    msg = str(e.value)
    assert INCEPTION_WEIGHTS_FILE in msg and INCEPTION_WEIGHTS_ENV in msg
    assert os.path.join(str(clean_env), "torch_home", "hub", "checkpoints") in msg

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="downloading failed"):
        resolve_inception_weights(None)
    with pytest.raises(FileNotFoundError, match="explicitly given path"):
        resolve_inception_weights(str(clean_env / "nope.pth"))
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(clean_env / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV):
        resolve_inception_weights(None)


# ---------------------------------------------------------------- layout
def test_callbacks_do_not_import_the_cli():
    """callbacks/ (and the shared image reader) never import `ardiff` (the CLI), even lazily at evaluation time."""
    import subprocess
    import sys

    code = (
        "import sys, callbacks, callbacks.fid, callbacks.judge, datamodules.images; "
        "bad = sorted(m for m in sys.modules if m == 'ardiff' or m.startswith('ardiff.')); "
        "assert not bad, bad; "
        "import inspect; src = inspect.getsource(callbacks.fid) + inspect.getsource(callbacks.judge); "
        "assert 'import ardiff' not in src and 'from ardiff' not in src"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]

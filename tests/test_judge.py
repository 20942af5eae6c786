"""JudgeCallback: `val/class_acc` and `val/fd_judge` equal a direct numpy/scipy computation on the same images; the
class accuracy is 1 for real images of the asked class and chance for class-blind samples; a judge trained by
`ardiff judge train` is cached with its held-out accuracy; the figures do not depend on the world size (2-process
gloo DDP). The multi-process run uses this file as its training script (`python -m tests.test_judge ...`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import timm
import torch
from lightning import Trainer
from PIL import Image
from torch import Tensor, nn

from callbacks.judge import Judge, JudgeCallback, default_judge_path, load_judge, save_judge, save_statistics
from callbacks.sampling import generate_chunk
from models.checkpoint import CheckpointError
from tests.test_eval_common import FakeGenerator, dummy_loader

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": [8, 16, 16, 16], "stem_width": 8, "output_stride": 8}  # a few-k-parameter timm resnet10t


# ------------------------------------------------------------------ stubs
class StubNet(nn.Module):
    """timm's classifier interface with known maps: features = P @ avgpool4x4(x), logits = W @ features + b."""

    def __init__(self, proj: np.ndarray, head: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.proj = nn.Linear(proj.shape[1], proj.shape[0], bias=False)
        self.head = nn.Linear(head.shape[1], head.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(proj))
            self.head.weight.copy_(torch.from_numpy(head))
            self.head.bias.copy_(torch.from_numpy(bias))
        self.num_classes, self.num_features = head.shape[0], head.shape[1]

    def forward_features(self, x: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        f = self.proj(x)  # (B, F)
        return f if pre_logits else self.head(f)

    def get_classifier(self) -> nn.Module:
        return self.head


def numpy_features(images: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Independent computation of StubNet's features of uint8 (N,3,16,16) images, float64 (N, F)."""
    x = (images.astype(np.float64) / 255 - 0.5) / 0.5
    pooled = x.reshape(len(x), 3, 4, 4, 4, 4).mean(axis=(3, 5)).reshape(len(x), 48)
    return pooled @ proj.T


def numpy_fd(a: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fit(model: L.LightningModule, callback: JudgeCallback, steps: int = 1, **kwargs) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=[callback],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      **kwargs)  # fmt: skip
    trainer.fit(model, train_dataloaders=dummy_loader())
    return trainer


def test_judge_figures_equal_direct_computation(tmp_path, capsys):
    model = FakeGenerator(num_classes=4)
    cb = JudgeCallback(judge=str(tmp_path / "unused.pt"), reference=str(tmp_path / "ref.npz"), num_samples=20,
                       chunk_size=6, every_n_steps=1, batch_size=7)  # fmt: skip
    plan = cb.plan(model)  # 4 chunks of 6 (the last padded): the images the callback will measure
    images = torch.cat([generate_chunk(model.sample_images, plan, k, torch.device("cpu")) for k in range(4)]).numpy()
    labels = np.repeat(np.arange(4), 5)  # MAR's class-balanced labels for N=20, C=4
    # stub judge: a random projection to 6 features, then the nearest class mean (of a noisier copy of the features)
    proj = np.random.default_rng(0).normal(size=(6, 48))
    feats = numpy_features(images, proj)
    noisy = feats + np.random.default_rng(2).normal(size=feats.shape) * feats.std(0) * 1.5
    means = np.stack([noisy[labels == c].mean(0) for c in range(4)])  # (4, 6)
    head, bias = means, -0.5 * (means**2).sum(1)  # argmax of W f + b = the nearest class mean
    logits = feats @ head.T + bias
    expected_acc = float((logits.argmax(1) == labels).mean())
    assert 0.5 < expected_acc < 1 and expected_acc != float((logits.argmax(1) == (labels + 1) % 4).mean())
    cb.judge, cb.judge_path = Judge(StubNet(proj, head, bias), image_size=16), "stub"

    ref_feats = np.random.default_rng(1).normal(size=(40, 6))
    mu_r, sigma_r = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    save_statistics(str(tmp_path / "ref.npz"), {"mu": mu_r, "sigma": sigma_r}, "test")
    trainer = fit(model, cb, steps=2)
    assert cb.last_metrics["class_acc"] == pytest.approx(expected_acc, abs=1e-6)  # 14 of 20
    assert cb.last_metrics["fd_judge"] == pytest.approx(numpy_fd(feats, mu_r, sigma_r), rel=1e-6)
    assert trainer.callback_metrics["val/class_acc"].item() == pytest.approx(expected_acc)
    assert "val/fd_judge" in trainer.progress_bar_metrics
    out = capsys.readouterr().out
    assert f"val/class_acc={expected_acc:.4f}" in out and "val/fd_judge=" in out  # final figures on stdout


# ------------------------------------------------------------------ a real (tiny) trained judge
def colour_folder(root: Path, per_class: int, seed: int) -> None:
    """4 classes of 16 px images: a class-coloured square at a random place on a random grey background."""
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 30, 30], [30, 200, 30], [30, 30, 230], [230, 230, 30]])
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.full((16, 16, 3), rng.integers(60, 160), dtype=np.uint8)
            y, x = rng.integers(0, 8, size=2)
            img[y : y + 8, x : x + 8] = colours[c]
            Image.fromarray(img).save(root / f"c{c}" / f"{i:03d}.png")


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory) -> Path:
    from datamodules.shards import write_shards

    root = tmp_path_factory.mktemp("colours")
    for split, n, seed in (("train", 60, 0), ("val", 10, 1)):
        colour_folder(root / "images" / split, n, seed)
        write_shards(root / "images" / split, root / "shards" / split, prefix=split, maxcount=50, workers=0,
                     progress=False)  # fmt: skip
    return root / "shards"


class ShardInfo(L.LightningDataModule):
    """What JudgeCallback reads from a DataModule (train/val shards, image size), with a dummy train loader."""

    def __init__(self, shards: Path) -> None:
        super().__init__()
        self.train_shards, self.val_shards, self.image_size = str(shards / "train"), str(shards / "val"), 16

    def train_dataloader(self):
        return dummy_loader()


class RealImages(FakeGenerator):
    """Returns real val images of the asked class (or, with `blind`, of a class drawn independently of it)."""

    def __init__(self, shards: Path, blind: bool = False) -> None:
        super().__init__(num_classes=4)
        from datamodules.images import load_labeled_images

        self.images, self.labels = load_labeled_images(str(shards / "val"))
        self.blind = blind

    def sample_images(self, labels: Tensor, generator: torch.Generator | None = None, **_) -> Tensor:
        if self.blind:
            labels = torch.randint(0, 4, labels.shape, generator=generator)
        picks = []
        for c in labels.tolist():
            pool = (self.labels == c).nonzero().flatten()
            picks.append(pool[torch.randint(0, len(pool), (1,), generator=generator)])
        return self.images[torch.cat(picks)].float() / 127.5 - 1  # (B, 3, 16, 16) in [-1, 1]


TRAIN_KWARGS = {"model_kwargs": TINY, "epochs": 6, "batch_size": 16, "lr": 5e-3, "image_size": 16}


def test_trained_judge_class_acc_real_is_one_and_blind_is_chance(colour_shards, capsys):
    train_kwargs = TRAIN_KWARGS
    real = JudgeCallback(judge="auto", num_samples=40, chunk_size=20, train_kwargs=train_kwargs)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, callbacks=[real],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(RealImages(colour_shards), datamodule=ShardInfo(colour_shards))
    path = Path(default_judge_path(str(colour_shards / "train"), "resnet10t", 16, train_kwargs))
    assert path.name.startswith("judge_resnet10t_16-")  # not the defaults: the name says so
    info = json.loads(path.with_suffix(".json").read_text())
    assert real.judge_path == str(path) and info["held_out_accuracy"] == 1.0 and info["num_held_out"] == 40
    assert "held-out accuracy 1.0000" in capsys.readouterr().out
    assert real.last_metrics["class_acc"] == 1.0
    assert real.last_metrics["fd_judge"] >= 0

    blind = JudgeCallback(judge="auto", num_samples=400, chunk_size=100, train_kwargs=train_kwargs)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, callbacks=[blind],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(RealImages(colour_shards, blind=True), datamodule=ShardInfo(colour_shards))
    assert "training one" not in capsys.readouterr().out  # the cached judge is reused
    assert blind.last_metrics["class_acc"] == pytest.approx(0.25, abs=0.07)  # chance for 4 classes, 400 samples
    assert blind.last_metrics["fd_judge"] < 5 * max(real.last_metrics["fd_judge"], 1e-3) + 1  # same image set


def test_default_judge_path_names_non_default_training(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "train-000000.tar").touch()
    train = str(tmp_path / "train")
    plain = default_judge_path(train, "resnet10t", 32)
    assert plain == str(tmp_path / "train" / "judge_resnet10t_32.pt")
    assert default_judge_path(train, "resnet10t", 32, {"epochs": 12, "threads": 2, "seed": 0}) == plain  # defaults
    three = default_judge_path(train, "resnet10t", 32, {"epochs": 3})
    assert three != plain and three != default_judge_path(train, "resnet10t", 32, {"epochs": 4})
    assert three == default_judge_path(train, "resnet10t", 32, {"epochs": 3, "threads": 1})  # threads: same recipe


def test_auto_judge_refuses_a_cache_trained_otherwise(tmp_path):
    """A cached default judge whose json records other training settings (an old 3-epoch cache under the default
    name, or a changed seed) is an error naming the file, never silently used as the judge the recipe asks for."""
    from types import SimpleNamespace

    from callbacks.judge import check_cached_judge

    (tmp_path / "train").mkdir()
    train = str(tmp_path / "train")
    path = Path(default_judge_path(train, "resnet10t", 32))
    path.write_bytes(b"not read")
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_shards=train, image_size=32), is_global_zero=True)
    old = {"arch": "resnet10t", "image_size": 32, "epochs": 3, "seed": 0, "flip": False, "max_shift": 3}
    path.with_suffix(".json").write_text(json.dumps(old))  # written before the json had `settings`
    with pytest.raises(ValueError, match=r"judge_resnet10t_32\.pt.*epochs=3 \(asked: 12\).*Delete it"):
        JudgeCallback(judge="auto").setup_judge(trainer)
    check_cached_judge(str(path), {"epochs": 3, "image_size": 32})  # what it was trained with: accepted
    new = {"settings": {"image_size": 32, "epochs": 12, "batch_size": 64, "lr": 3e-3, "seed": 1}}
    path.with_suffix(".json").write_text(json.dumps(new))
    with pytest.raises(ValueError, match=r"seed=1 \(asked: 0\)"):
        check_cached_judge(str(path), {})
    with pytest.raises(ValueError, match="seed=1"):
        JudgeCallback(judge="auto").setup_judge(trainer)


def test_ardiff_eval_with_judge(colour_shards, tmp_path):
    from ardiff import evaluate
    from callbacks.judge import ensure_judge
    from datamodules.images import load_labeled_images

    judge = ensure_judge(str(colour_shards / "train" / "judge_resnet10t_16.pt"), str(colour_shards / "train"),
                         str(colour_shards / "val"), **TRAIN_KWARGS)  # fmt: skip
    out = tmp_path / "m.json"
    val, train = str(colour_shards / "val"), str(colour_shards / "train")
    assert evaluate.main([val, "--judge", judge, "--judge-ref", train, "--json", str(out)]) == 0
    real = json.loads(out.read_text())
    assert real["class_acc"] == 1.0 and real["num_images"] == 40 and real["fd_judge"] > 0  # val vs train images

    images, labels = load_labeled_images(val)  # as `ardiff sample` writes: arr_0 (N,H,W,3), labels (N,)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=((labels + 1) % 4).numpy())
    ref = tmp_path / "ref.npz"
    assert evaluate.main([train, "--judge", judge, "--write-judge-ref", str(ref)]) == 0
    assert evaluate.main([str(wrong), "--judge", judge, "--judge-ref", str(ref), "--json", str(out)]) == 0
    shifted = json.loads(out.read_text())
    assert shifted["class_acc"] == 0.0  # every label is off by one
    assert shifted["fd_judge"] == pytest.approx(real["fd_judge"], rel=1e-6)  # same images, cached reference


def test_judge_training_is_deterministic_and_holds_out_a_split(tmp_path):
    from callbacks.judge import train_judge

    colour_folder(tmp_path / "img", 10, seed=3)
    images = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "img").glob("c*/*.png"))])
    np.savez(tmp_path / "d.npz", arr_0=images, labels=np.repeat(np.arange(4), 10))  # as `ardiff sample` writes
    kwargs = {"model_kwargs": TINY, "epochs": 1, "batch_size": 8, "image_size": 16, "log": False}
    a, info = train_judge(str(tmp_path / "d.npz"), str(tmp_path / "a.pt"), **kwargs)
    b, _ = train_judge(str(tmp_path / "d.npz"), None, **kwargs)
    assert info["num_train"] == 36 and info["num_held_out"] == 4 and info["num_classes"] == 4
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert json.loads((tmp_path / "a.json").read_text())["held_out_accuracy"] == info["held_out_accuracy"]


def test_judge_file_is_safe_and_missing_file_says_how(tmp_path):
    model = timm.create_model("resnet10t", num_classes=3, **TINY)
    save_judge(Judge(model, 16, meta={"arch": "resnet10t", "model_kwargs": TINY}), tmp_path / "j.pt", {"x": 1})
    loaded = load_judge(str(tmp_path / "j.pt"))
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(loaded(images)[0], Judge(model, 16)(images)[0])
    with pytest.raises(FileNotFoundError, match="ardiff judge train"):
        load_judge(str(tmp_path / "nope.pt"))
    torch.save({"weight": torch.zeros(1)}, tmp_path / "raw.pth")
    with pytest.raises(ValueError, match="arch"):
        load_judge(str(tmp_path / "raw.pth"))
    torch.save({"state_dict": {}, "evil": argparse.ArgumentParser}, tmp_path / "evil.pt")  # a global: refused
    with pytest.raises(CheckpointError, match="refuses"):
        load_judge(str(tmp_path / "evil.pt"))


def test_pretrained_timm_judge_from_a_local_file(tmp_path):
    """ImageNet judges: timm weights (safetensors) + the timm architecture name; timm's preprocessing config."""
    import safetensors.torch

    model = timm.create_model("resnet10t.c3_in1k", pretrained=False)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "w.safetensors")
    judge = load_judge(str(tmp_path / "w.safetensors"), "resnet10t.c3_in1k")
    torch.testing.assert_close(judge.model.fc.weight, model.fc.weight)
    assert judge.num_classes == 1000 and judge.image_size == 224  # its pretrained_cfg test size (train: 176)
    logits, feats = judge(torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8))
    assert logits.shape == (2, 1000) and feats.shape == (2, judge.num_features)


# ------------------------------------------------------------------ world-size invariance
NUM_SAMPLES, CHUNK = 14, 3  # 5 chunks (the last one padded): rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and a filler


def make_judge_files(tmp_path: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4, **TINY)
    save_judge(Judge(model, 16, meta={"arch": "resnet10t", "model_kwargs": TINY}), tmp_path / "j.pt", {})
    feats = np.random.default_rng(0).normal(size=(64, model.num_features))
    save_statistics(str(tmp_path / "ref.npz"), {"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False)}, "t")
    return str(tmp_path / "j.pt"), str(tmp_path / "ref.npz")


def run(devices: int, judge: str, ref: str, out: str) -> None:
    torch.set_num_threads(1)
    cb = JudgeCallback(judge=judge, reference=ref, num_samples=NUM_SAMPLES, chunk_size=CHUNK, every_n_steps=1)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                      callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    trainer.fit(FakeGenerator(num_classes=4), train_dataloaders=dummy_loader())
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps({"metrics": cb.last_metrics, "world": trainer.world_size}))


def test_judge_ddp_equals_single_process(tmp_path):
    judge, ref = make_judge_files(tmp_path)
    run(1, judge, ref, str(tmp_path / "single.json"))
    cmd = [sys.executable, "-m", "tests.test_judge", "--judge", judge, "--ref", ref, "--out", str(tmp_path / "d.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    single, ddp = (json.loads((tmp_path / f).read_text()) for f in ("single.json", "d.json"))
    assert ddp["world"] == 2 and single["world"] == 1
    assert ddp["metrics"]["class_acc"] == single["metrics"]["class_acc"]
    assert 0 < single["metrics"]["class_acc"] < 1  # a discriminating case
    assert ddp["metrics"]["fd_judge"] == pytest.approx(single["metrics"]["fd_judge"], rel=1e-6)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--judge", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    run(2, a.judge, a.ref, a.out)


if __name__ == "__main__":
    main()

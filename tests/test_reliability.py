"""Reliability under operator conditions: unequal shards under DDP, non-finite training, bad data configuration.

The multi-process scenarios run this file as a worker: `python -m tests.test_reliability worker OUT SHARD...`.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_image_shard(path: Path, n: int, start: int = 0, size: int = 8, num_classes: int = 4) -> Path:
    """A WebDataset shard of `n` tiny PNG images (`{key}.png`, `{key}.cls`)."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(start)
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(i % num_classes).encode()})
    return path


# ---------------------------------------------------------------- DDP with shards of unequal size
def ddp_worker(out: str, shards: list[str]) -> None:
    import lightning as L

    from datamodules.webdataset import WebDataModule
    from tests.toy import ToyGenerator

    class CountSteps(L.Callback):
        def __init__(self) -> None:
            self.steps = 0

        def on_train_batch_end(self, *args) -> None:
            self.steps += 1

    torch.manual_seed(0)
    model = ToyGenerator(image_size=8, lr=1e-2, ema_decay=None)
    data = WebDataModule(
        train_shards=shards, kind="image", image_size=8, num_classes=4, batch_size=16, num_workers=1,
        shuffle_buffer=10, persistent_workers=False, prefetch_factor=2,
    )  # fmt: skip
    counter = CountSteps()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False, callbacks=[counter],
    )  # fmt: skip
    trainer.fit(model, data)
    Path(f"{out}.{trainer.global_rank}").write_text(json.dumps({"steps": counter.steps, "gs": trainer.global_step}))


def test_ddp_with_unequal_shards_runs_equal_steps_and_finishes(tmp_path):
    a = write_image_shard(tmp_path / "a.tar", 157, 0)  # 10 batches of 16 (the last one of 13)
    b = write_image_shard(tmp_path / "b.tar", 133, 1000)  # 9 batches (the last one of 5)
    out = tmp_path / "steps"
    cmd = [sys.executable, "-m", "tests.test_reliability", "ddp", str(out), str(a), str(b)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"steps": 9, "gs": 9}, ranks  # the smaller shard's 9 batches on both ranks


# ---------------------------------------------------------------- non-finite gradients with a finite loss
class _NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss whose gradients are not)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_grad_generator(bad_steps: set[int], **kwargs):
    from tests.toy import ToyGenerator

    class NaNGradToy(ToyGenerator):
        def compute_loss(self, batch):
            loss, logs = super().compute_loss(batch)
            return (_NaNGrad.apply(loss) if self.global_step in bad_steps else loss), logs

    torch.manual_seed(0)
    return NaNGradToy(image_size=8, **kwargs)


def toy_trainer(tmp_path: Path, max_steps: int, **kwargs):
    import lightning as L

    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def test_skip_drops_the_optimizer_and_ema_step_on_non_finite_gradients(tmp_path):
    from tests.toy import ToyData

    model = nan_grad_generator({2}, lr=1e-2, ema_decay=0.5, nan_policy="skip")
    seen = {}

    class Snapshot(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    toy_trainer(tmp_path, 4, callbacks=[Snapshot()]).fit(model, ToyData(n=64, batch_size=8))
    assert all_finite(model)
    state_after_bad_batch = seen[3]  # the batch at step 2 had NaN gradients: nothing may have moved
    for k, v in seen[2].items():
        assert torch.equal(v, state_after_bad_batch[k]), k
    assert not torch.equal(seen[1]["net.head.weight"], seen[2]["net.head.weight"])  # good steps do train
    opt_state = model.trainer.optimizers[0].state[model.net.head.weight]
    assert int(opt_state["step"]) == 3  # 4 batches, one skipped


def test_stop_raises_on_non_finite_gradients_before_any_update(tmp_path):
    from lightning_modules.base import NonFiniteLossError
    from tests.toy import ToyData

    model = nan_grad_generator({1}, lr=1e-2, ema_decay=0.5, nan_policy="stop")
    with pytest.raises(NonFiniteLossError, match="non-finite gradients .* global step 1"):
        toy_trainer(tmp_path, 4).fit(model, ToyData(n=64, batch_size=8))
    assert all_finite(model)


def test_huge_lr_with_skip_keeps_weights_finite(tmp_path):
    """The issue's scenario on the tiny TransDiff: lr 1e10, no clipping, nan_policy=skip, 20 steps. Its loss stays
    finite while its gradients turn NaN; weights, EMA and the written checkpoint must stay finite."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from lightning_modules.transdiff import TransDiffModule
    from models.checkpoint import safe_torch_load
    from tests.toy import RandomImages

    torch.manual_seed(0)
    model = TransDiffModule(arch="tiny", vae="identity", lr=1e10, ema_decay=0.9, nan_policy="skip")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=10)
    trainer = toy_trainer(tmp_path, 20, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(model, DataLoader(RandomImages(n=320), batch_size=16))
    assert trainer.global_step == 20
    assert all_finite(model.net) and all_finite(model.ema_net)
    saved = safe_torch_load(tmp_path / "ckpt" / "last.ckpt")
    assert saved["global_step"] == 20
    assert all(bool(torch.isfinite(t).all()) for t in saved["state_dict"].values() if t.is_floating_point())


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    from lightning_modules.base import NonFiniteWeightsError
    from tests.toy import ToyData

    model = nan_grad_generator(set(), lr=1e-2, ema_decay=None)
    trainer = toy_trainer(tmp_path, 1)
    trainer.fit(model, ToyData(n=64, batch_size=8))
    with torch.no_grad():
        model.net.head.bias[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="net.head.bias"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


# ---------------------------------------------------------------- data configuration errors stop the run
@pytest.mark.parametrize("workers", [0, 1])
def test_kind_mismatch_stops_at_once_naming_the_cause(tmp_path, workers):
    from datamodules.webdataset import DataConfigError, WebDataModule

    shard = write_image_shard(tmp_path / "img.tar", 20)
    dm = WebDataModule(
        train_shards=str(shard), kind="latent", batch_size=4, num_workers=workers, resampled=True, epoch_length=5,
        persistent_workers=False, prefetch_factor=2 if workers else None,
    )  # fmt: skip
    with pytest.raises(DataConfigError, match=r"kind='latent'.*img.tar.* holds image samples.*kind: image"):
        next(iter(dm.build_train_loader(0, 1)))
    assert dm.num_skipped == 0


def test_too_many_consecutive_failures_stop_the_run(tmp_path):
    import webdataset as wds

    from datamodules.webdataset import DataPipelineError, WebDataModule

    with wds.TarWriter(str(tmp_path / "junk.tar")) as sink:  # image fields that are not images
        for i in range(30):
            sink.write({"__key__": f"{i:06d}", "png": b"not a png", "cls": b"0"})
    dm = WebDataModule(
        train_shards=str(tmp_path / "junk.tar"), kind="image", image_size=8, batch_size=4, num_workers=0,
        resampled=True, epoch_length=5, max_consecutive_failures=50,
    )  # fmt: skip
    with pytest.raises(DataPipelineError, match="51 samples or shards in a row failed.*max_consecutive_failures=50"):
        next(iter(dm.build_train_loader(0, 1)))
    assert dm.num_skipped == 51


def test_isolated_corrupt_samples_are_still_skipped(tmp_path):
    from datamodules.webdataset import WebDataModule

    good = write_image_shard(tmp_path / "good.tar", 12)
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "mixed.tar")) as sink:
        for i in range(12):
            sink.write({"__key__": f"b{i:05d}", "png": b"junk", "cls": b"0"})
    dm = WebDataModule(
        train_shards=[str(good), str(tmp_path / "mixed.tar")], kind="image", image_size=8, batch_size=4,
        num_workers=0, shuffle_buffer=0, max_consecutive_failures=12,
    )  # fmt: skip
    batches = list(dm.build_train_loader(0, 1))
    assert sum(len(b["label"]) for b in batches) == 12 and dm.num_skipped == 12


# ---------------------------------------------------------------- sampling under FSDP2
SAMPLERS = {
    "transdiff_tiny": ("lightning_modules.transdiff:TransDiffModule", {"arch": "tiny", "vae": "identity"}, 32),
    "dar_gpt_tiny": ("lightning_modules.dar:DARGPTModule", {"gpt": "tiny"}, None),
}


def sample(model, name: str) -> torch.Tensor:
    """A few samples through the module's sampling context (TransDiff: images; D-AR GPT: tokens, no tokenizer)."""
    labels, generator = torch.tensor([0, 1, 2]), torch.Generator().manual_seed(1)
    if name == "transdiff_tiny":
        return model.sample_images(labels, generator=generator, num_steps=2)
    from models.dar_gpt import sample_tokens

    with torch.no_grad(), model.sampling() as net:
        return sample_tokens(net, labels, generator=generator)


def fsdp2_sample_worker(out: str, name: str) -> None:
    """Train two steps under FSDP2 on 2 CPU processes, then sample on both ranks (EMA and online weights)."""
    import importlib

    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_modules.strategies import FSDP2Strategy
    from tests.toy import RandomImages, RandomTokens

    spec, kwargs, size = SAMPLERS[name]
    module, cls = spec.split(":")
    torch.manual_seed(0)
    model = getattr(importlib.import_module(module), cls)(lr=1e-3, ema_decay=0.5, **kwargs)
    data = RandomImages(n=8, image_size=size) if size else RandomTokens(n=8)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=2, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=4))
    samples = sample(model, name)
    ema, model.ema_net = model.ema_net, None
    online = sample(model, name)
    model.ema_net = ema
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    torch.save({"ema": samples, "online": online, "state": full}, f"{out}.{trainer.global_rank}")
    trainer.save_checkpoint(f"{out}.sharded")  # a distributed checkpoint folder, for `ardiff sample`


@pytest.mark.parametrize("name", ["transdiff_tiny", pytest.param("dar_gpt_tiny", marks=pytest.mark.slow)])
def test_fsdp2_sampling_matches_the_unsharded_model(tmp_path, name):
    import importlib

    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "tests.test_reliability", "fsdp2_sample", str(out), name]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    spec, kwargs, _ = SAMPLERS[name]
    module, cls = spec.split(":")
    ref = getattr(importlib.import_module(module), cls)(ema_decay=0.5, **kwargs)
    ref.load_state_dict(r0["state"])  # the same weights in one process, unsharded
    expected = sample(ref, name)
    ref.ema_net = None
    expected_online = sample(ref, name)
    assert not torch.equal(expected, expected_online)  # EMA and online weights differ after a step
    for r in (r0, r1):
        torch.testing.assert_close(r["ema"], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["online"], expected_online, rtol=1e-4, atol=1e-4)
    if name == "transdiff_tiny":  # `ardiff sample` straight from the sharded run's checkpoint folder
        from ardiff.convert import main as convert
        from ardiff.sample import main as ardiff_sample

        convert([f"{out}.sharded", str(tmp_path / "full.ckpt")])
        common = ["--module", spec.replace(":", "."), "--num-samples", "4", "--chunk-size", "2", "--set", "num_steps=2"]
        assert ardiff_sample([*common, "--ckpt", f"{out}.sharded", "--out", str(tmp_path / "a.npz")]) == 0
        assert ardiff_sample([*common, "--ckpt", str(tmp_path / "full.ckpt"), "--out", str(tmp_path / "b.npz")]) == 0
        a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
        assert a.shape == (4, 32, 32, 3) and np.array_equal(a, b)


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        ddp_worker(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "fsdp2_sample":
        fsdp2_sample_worker(sys.argv[2], sys.argv[3])

"""A classifier judge of class-conditional samples: `val/class_acc` and `val/fd_judge`, offline.

`val/class_acc`: the fraction of class-conditional samples that the judge classifies as the label they were
conditioned on. `val/fd_judge`: the Frechet distance between the judge's penultimate (pre-logits) features of the
samples and of real validation images (reference statistics computed once and cached next to the judge file).

The judge is a timm classifier, either
- trained by ardiff on a small data set's shards (`ardiff judge train SHARDS`, or `judge: auto` in the callback,
  which trains it on first use): deterministic (seeded), cached as `<train shard dir>/judge_<arch>_<res>.pt` with a
  `.json` next to it holding its held-out accuracy; or
- a pretrained timm model from a local weights file (`judge: /path/model.safetensors`, `arch: resnet50.a1_in1k`),
  for ImageNet; nothing is downloaded.

Sampling is FIDCallback's (callbacks/sampling.py): the same N class-balanced samples on any number of ranks; metric
state and DDP synchronisation are torchmetrics metrics whose `compute()` runs on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from callbacks.metrics import FeatureMoments, frechet_distance
from callbacks.sampling import SamplePlan, eval_mode, iter_rank_chunks
from datamodules.images import iter_images, load_labeled_images, shard_dir

JUDGE_FORMAT = "ardiff-judge-v1"
# the judge trained on small data sets: timm's resnet10t at a quarter width, stride 8 (a 4x4 final map at 32 px):
# 0.32M parameters, ~42 MFLOP per 32 px image (forward + backward); >99% held-out accuracy on the demo shapes
SMALL_ARCH = "resnet10t"
SMALL_KWARGS = {"output_stride": 8, "channels": [16, 32, 64, 128], "stem_width": 16}


class Judge(nn.Module):
    """A timm classifier with its preprocessing: uint8 images (B,3,H,W) -> (logits (B,C), features (B,F)).

    Images are resized (antialiased bilinear) so the short side is `image_size / crop_pct`, center-cropped to
    `image_size`, scaled to [0,1] and normalised with `mean`/`std`. Features are timm's pre-logits features.
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        crop_pct: float = 1.0,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        self.model, self.image_size, self.crop_pct = model, image_size, crop_pct
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.meta = dict(meta or {})
        self.eval()

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B,3,H,W) -> normalised float (B,3,S,S)."""
        x = images.float() / 255
        resize = round(self.image_size / self.crop_pct)
        if min(x.shape[-2:]) != resize:
            h, w = x.shape[-2:]
            size = (resize, round(w * resize / h)) if h <= w else (round(h * resize / w), resize)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        if x.shape[-2:] != (self.image_size, self.image_size):
            top, left = (x.shape[-2] - self.image_size) // 2, (x.shape[-1] - self.image_size) // 2
            x = x[..., top : top + self.image_size, left : left + self.image_size]
        return (x - self.mean) / self.std

    def forward_normalized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fmap = self.model.forward_features(x)
        features = self.model.forward_head(fmap, pre_logits=True)  # (B, F)
        return self.model.get_classifier()(features), features  # (B, C), (B, F)

    @torch.no_grad()
    def forward(self, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3, images.shape
        device = self.mean.device
        logits, feats = [], []
        with torch.autocast(device.type, enabled=False):
            for batch in images.split(batch_size):
                out = self.forward_normalized(self.preprocess(batch.to(device)))
                logits.append(out[0].float())
                feats.append(out[1].float())
        return torch.cat(logits), torch.cat(feats)


# ------------------------------------------------------------------------------------------------ files
def _missing_judge(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"judge weights {path!r} not found. For a small data set, train a judge on its shards with "
        f"`ardiff judge train <train shards> --out {path}` (or set `judge: auto` / `train_if_missing: true` in "
        "JudgeCallback); for ImageNet, download a timm classifier's weights on a machine with internet (e.g. "
        "`huggingface-cli download timm/resnet50.a1_in1k model.safetensors`) and pass the file as `judge: <path>` "
        "with `arch: resnet50.a1_in1k` (or `--judge <path> --judge-arch ...` for `ardiff eval`)."
    )


def save_judge(judge: Judge, path: str | Path, info: dict) -> None:
    """Write an ardiff judge file (tensors and plain values only; loaded with weights_only=True) and its json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format": JUDGE_FORMAT,
        "arch": judge.meta["arch"],
        "model_kwargs": judge.meta.get("model_kwargs", {}),
        "num_classes": judge.num_classes,
        "image_size": judge.image_size,
        "mean": judge.mean.flatten().tolist(),
        "std": judge.std.flatten().tolist(),
        "state_dict": {k: v.detach().cpu() for k, v in judge.model.state_dict().items()},
        "info": info,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    os.replace(tmp, path)
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(info, indent=1) + "\n")


def load_judge(path: str, arch: str | None = None, num_classes: int | None = None) -> Judge:
    """An ardiff judge file (`ardiff judge train`), or timm weights (.safetensors / .pth / .bin) of `arch`."""
    if not os.path.isfile(path):
        raise _missing_judge(path)
    if not path.endswith(".safetensors"):
        from models.checkpoint import safe_torch_load

        record = safe_torch_load(path)
        if isinstance(record, dict) and record.get("format") == JUDGE_FORMAT:
            model = timm.create_model(record["arch"], num_classes=record["num_classes"], **record["model_kwargs"])
            model.load_state_dict(record["state_dict"])
            meta = {k: record[k] for k in ("arch", "model_kwargs")} | {"info": record.get("info", {}), "path": path}
            return Judge(model, record["image_size"], tuple(record["mean"]), tuple(record["std"]), 1.0, meta)
    if not arch:
        raise ValueError(
            f"{path} is not an ardiff judge file: name the timm architecture of these weights (`arch: resnet50.a1_in1k`"
            " in JudgeCallback, `--judge-arch` for `ardiff eval`)"
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    cfg = timm.data.resolve_data_config({}, model=model, use_test_size=True)  # its evaluation resolution
    meta = {"arch": arch, "model_kwargs": kwargs, "path": path}
    return Judge(model, cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"], meta)


_PATH_KEYS = ("arch", "image_size", "threads", "log")  # in the judge file name already, or no effect on the judge
# train_judge settings recorded in the judge's json (the arch is in its name and its meta)
_SETTING_KEYS = tuple(
    "image_size epochs batch_size lr weight_decay max_shift flip held_out_fraction seed max_images".split()
)


def default_judge_path(
    train_shards: str, arch: str = SMALL_ARCH, image_size: int = 32, settings: dict | None = None
) -> str:
    """`<train shard dir>/judge_<arch>_<image_size>.pt`; training `settings` (train_judge kwargs) that differ from
    train_judge's defaults add `-<hash>` to the name, so that a judge trained otherwise (fewer epochs, another seed)
    is never taken for the default one by a recipe that asks for the defaults."""
    defaults = {k: p.default for k, p in inspect.signature(train_judge).parameters.items()}
    changed = {
        k: v for k, v in sorted((settings or {}).items())
        if k not in _PATH_KEYS and v != defaults.get(k, inspect.Parameter.empty)
    }  # fmt: skip
    tag = "-" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8] if changed else ""
    return os.path.join(shard_dir(train_shards), f"judge_{arch}_{image_size}{tag}.pt")


# ------------------------------------------------------------------------------------------------ training
def _num_classes_of(source: str, labels: Tensor) -> int:
    is_npz = isinstance(source, str) and source.endswith(".npz")
    index = "" if is_npz else os.path.join(shard_dir(source), "class_index.json")
    if index and os.path.isfile(index):
        return len(json.loads(Path(index).read_text()))
    return int(labels.max()) + 1


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Per-image random translation by up to `max_shift` pixels (edge pixels repeated), (B,3,H,W)."""
    if max_shift <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen).tolist()
    return torch.stack([p[:, a : a + h, b : b + w] for p, (a, b) in zip(padded, offsets, strict=True)])


def accuracy(judge: Judge, images: Tensor, labels: Tensor) -> float:
    logits, _ = judge(images)
    return (logits.argmax(1).cpu() == labels).float().mean().item()


def train_judge(
    train: str,
    out: str | None = None,
    val: str | None = None,
    arch: str = SMALL_ARCH,
    model_kwargs: dict | None = None,
    image_size: int = 32,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    max_shift: int = 3,
    flip: bool = False,
    held_out_fraction: float = 0.1,
    seed: int = 0,
    max_images: int | None = None,
    threads: int | None = 1,
    log: bool = True,
) -> tuple[Judge, dict]:
    """Train a timm classifier on labelled images (shards with `cls`, or an npz with `labels`), deterministically.

    Held-out accuracy is measured on `val` (other shards) or, without it, on a seeded `held_out_fraction` of `train`
    that is not trained on. Augmentation: random shifts of up to `max_shift` px; horizontal flips only if `flip`
    (never for digits or text). AdamW with a one-cycle schedule. Writes `out` (+ .json) when given.
    `threads`: torch threads while training (None: unchanged). The default 1 is the fastest for this tiny network
    on a shared CPU: measured 36 ms CPU per batch with 1 thread, 20x more with 2 on a loaded 2-core machine.
    """
    if threads is not None and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return train_judge(train, out, val, arch, model_kwargs, image_size, epochs, batch_size, lr, weight_decay,
                               max_shift, flip, held_out_fraction, seed, max_images, None, log)  # fmt: skip
        finally:
            torch.set_num_threads(before)
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model_kwargs = dict(SMALL_KWARGS if model_kwargs is None and arch == SMALL_ARCH else model_kwargs or {})
    images, labels = load_labeled_images(train, image_size, max_images)  # (N,3,S,S) uint8, (N,)
    num_classes = _num_classes_of(train, labels)
    if val:
        val_images, val_labels = load_labeled_images(val, image_size)
        held_out = val
    else:
        perm = torch.randperm(len(labels), generator=gen)
        n_val = max(1, int(len(labels) * held_out_fraction))
        val_images, val_labels = images[perm[:n_val]], labels[perm[:n_val]]
        images, labels = images[perm[n_val:]], labels[perm[n_val:]]
        held_out = f"{held_out_fraction:.0%} of {train} (seed {seed})"
    model = timm.create_model(arch, num_classes=num_classes, **model_kwargs)
    judge = Judge(model, image_size, meta={"arch": arch, "model_kwargs": model_kwargs})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(labels) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = judge.preprocess(images[idx])  # (B, 3, S, S)
            x = _shift(x, max_shift, gen)
            if flip:
                mirror = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        judge.eval()
        if log:
            acc = accuracy(judge, val_images, val_labels)
            took = time.perf_counter() - start
            print(
                f"[ardiff judge] epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, held-out {acc:.4f} ({took:.0f}s)"
            )
    judge.eval()
    held_out_acc = accuracy(judge, val_images, val_labels)
    info = {
        "arch": arch,
        "model_kwargs": model_kwargs,
        "num_classes": num_classes,
        "image_size": image_size,
        "train": str(train),
        "num_train": len(labels),
        "held_out": str(held_out),
        "num_held_out": len(val_labels),
        "held_out_accuracy": held_out_acc,
        "settings": {k: v for k, v in locals().items() if k in _SETTING_KEYS},  # this function's arguments
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    judge.meta["info"] = info
    if out:
        save_judge(judge, out, info)
        judge.meta["path"] = str(out)
    print(
        f"[ardiff judge] {arch} on {len(labels)} images of {num_classes} classes: held-out accuracy "
        f"{held_out_acc:.4f} on {len(val_labels)} images ({held_out}), {info['train_seconds']:.0f}s"
        + (f"; wrote {out}" if out else "")
    )
    return judge, info


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive lock on `path + '.lock'` (so that concurrent runs train a judge once)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_cached_judge(path: str, train_kwargs: dict) -> None:
    """Raise if the cached judge at `path` was trained with other settings than `train_kwargs` (filled with
    train_judge's defaults), so that an old cache (e.g. from a recipe version that asked for fewer epochs) is never
    silently taken for the judge asked for. Jsons written before the `settings` entry are read from their top level,
    which recorded epochs, seed, flip and max_shift."""
    info_path = Path(path).with_suffix(".json")
    if not (os.path.isfile(path) and info_path.is_file()):
        return
    info = json.loads(info_path.read_text())
    recorded = info.get("settings", info)
    wanted = {k: p.default for k, p in inspect.signature(train_judge).parameters.items()} | train_kwargs
    stale = [k for k in _SETTING_KEYS if k in recorded and k in wanted and recorded[k] != wanted[k]]
    if stale:
        diff = ", ".join(f"{k}={recorded[k]!r} (asked: {wanted[k]!r})" for k in stale)
        raise ValueError(
            f"{path}: this cached judge was trained with {diff}, so its figures are not comparable with this "
            f"recipe's. Delete it and its .json to train the judge this recipe asks for, or give its path as the "
            f"judge (not 'auto') to use it as it is."
        )


def ensure_judge(path: str, train: str, val: str | None = None, **train_kwargs) -> str:
    """Train the judge into `path` unless it exists (under a file lock); return `path`."""
    if os.path.isfile(path):
        return path
    with file_lock(path):
        if not os.path.isfile(path):
            print(f"[ardiff judge] no judge at {path}: training one on {train} (once; cached for later runs)")
            train_judge(train, path, val, **train_kwargs)
    return path


# ------------------------------------------------------------------------------------------------ reference
def judge_statistics(judge: Judge, source: str, image_size: int | None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Mean and covariance (float64) of the judge features of every image of `source` (this process only)."""
    moments = FeatureMoments(judge.num_features, sync_on_compute=False).to(judge.mean.device)
    for images in iter_images(source, batch_size, image_size):
        moments.update(judge(images, batch_size)[1])
    return moments.compute()


def reference_path(judge_path: str, source: str | list[str], image_size: int | None) -> str:
    """`<judge>.ref-<hash of (source, image_size)>.npz`: the cache of the judge statistics of `source`."""
    paths = [source] if isinstance(source, str) else list(source)
    paths = [os.path.abspath(s) if os.path.exists(s) else s for s in paths]
    key = hashlib.sha1(f"{paths}|{image_size}".encode())
    return f"{os.path.splitext(judge_path)[0]}.ref-{key.hexdigest()[:10]}.npz"


def save_statistics(path: str, stats: dict[str, np.ndarray], source: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, judge_mu=stats["mu"], judge_sigma=stats["sigma"], source=np.array(source))
    os.replace(tmp, path)


def load_statistics(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        if "judge_mu" not in npz.files:
            raise KeyError(f"{path}: not judge reference statistics (no `judge_mu`; keys {npz.files})")
        return {"mu": npz["judge_mu"], "sigma": npz["judge_sigma"]}


# ------------------------------------------------------------------------------------------------ callback
class JudgeCallback(L.Callback):
    """Log `{prefix}/class_acc` and `{prefix}/fd_judge` every N steps / epochs, at the last training step, and at the
    end of `trainer.validate` / `trainer.test`; print the final figures at the end of training.

    Args:
        judge: "auto" (a judge trained on the DataModule's train shards on first use, cached as
            `<train shard dir>/judge_<arch>_<image_size>.pt`), an ardiff judge file, or timm weights of `arch`.
        arch: timm architecture ("auto" training, or the architecture of timm weights given as `judge`).
        train_if_missing: when `judge` is a path that does not exist, train a small judge there on the train shards
            (as "auto" does); off by default, so that a mistyped path to pretrained weights is an error.
        reference: npz of judge reference statistics; default: computed from the DataModule's val shards on first
            use (rank 0, center-cropped to the DataModule's image_size) and cached next to the judge file.
        num_samples / chunk_size / seed / num_classes / sample_kwargs: the sample set, as in FIDCallback.
        train_kwargs: passed to `train_judge` (epochs, image_size, flip, ...).
    """

    def __init__(
        self,
        judge: str = "auto",
        arch: str = SMALL_ARCH,
        train_if_missing: bool = False,
        reference: str | None = None,
        num_samples: int = 1000,
        chunk_size: int = 100,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        sample_kwargs: dict | None = None,
        batch_size: int = 256,
        train_kwargs: dict | None = None,
        prefix: str = "val",
    ) -> None:
        super().__init__()
        self.judge_spec, self.arch, self.train_if_missing, self.reference = judge, arch, train_if_missing, reference
        self.num_samples, self.chunk_size, self.seed, self.num_classes = num_samples, chunk_size, seed, num_classes
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.sample_kwargs, self.batch_size = dict(sample_kwargs or {}), batch_size
        self.train_kwargs, self.prefix = dict(train_kwargs or {}), prefix
        self.judge: Judge | None = None  # kept here, not in the (possibly sharded) LightningModule
        self.judge_path: str | None = None
        self.ref: dict[str, np.ndarray] | None = None
        self.last_metrics: dict[str, float] = {}
        self._last_eval_step = -1

    def plan(self, pl_module: L.LightningModule) -> SamplePlan:
        return SamplePlan(self.num_samples, self.num_classes or pl_module.num_classes, self.chunk_size, self.seed)

    # ---- judge and reference (rank 0 writes, every rank waits and loads) ----
    def _image_size(self, trainer: L.Trainer) -> int | None:
        return getattr(trainer.datamodule, "image_size", None)

    def setup_judge(self, trainer: L.Trainer) -> Judge:
        if self.judge is not None:
            return self.judge
        dm = trainer.datamodule
        train = getattr(dm, "train_shards", None)
        path = self.judge_spec
        if path == "auto":
            if not train:
                raise ValueError(
                    "JudgeCallback(judge='auto') needs a DataModule with `train_shards`; give a judge path"
                )
            size = self.train_kwargs.get("image_size", self._image_size(trainer) or 32)
            path = default_judge_path(train, self.arch, size, self.train_kwargs)
            check_cached_judge(path, {"image_size": size} | self.train_kwargs)  # every rank, before any barrier
        if self.judge_spec == "auto" or self.train_if_missing:  # the same branch on every rank (one barrier each)
            if trainer.is_global_zero:
                if not train and not os.path.isfile(path):
                    raise _missing_judge(path)
                kwargs = {"arch": self.arch, "image_size": self._image_size(trainer) or 32} | self.train_kwargs
                ensure_judge(path, train, getattr(dm, "val_shards", None), **kwargs)
            trainer.strategy.barrier("judge_train")
        self.judge_path = path
        self.judge = load_judge(path, self.arch)
        return self.judge

    def setup_reference(self, trainer: L.Trainer) -> dict[str, np.ndarray]:
        if self.ref is not None:
            return self.ref
        path, val, size = self.reference, getattr(trainer.datamodule, "val_shards", None), self._image_size(trainer)
        if path is None or val:  # the same branch on every rank (one barrier each)
            if path is None and not val:
                raise FileNotFoundError(
                    "JudgeCallback needs judge reference statistics: a DataModule with val_shards (computed on first "
                    "use), or `reference: OUT.npz` from `ardiff eval <val shards> --judge <judge> --write-judge-ref "
                    "OUT.npz`"
                )
            path = path or reference_path(self.judge_path, val, size)
            if trainer.is_global_zero and not os.path.isfile(path):
                with file_lock(path):
                    if not os.path.isfile(path):
                        save_statistics(path, judge_statistics(self.judge, val, size, self.batch_size), val)
                        print(f"[ardiff judge] wrote judge reference statistics of {val} to {path}")
            trainer.strategy.barrier("judge_reference")
        self.ref = load_statistics(path)
        return self.ref

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.setup_judge(trainer)

    # ---- schedule ----
    def _is_last_step(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        due = self.every_n_steps and step % self.every_n_steps == 0
        if (due or self._is_last_step(trainer)) and step != self._last_eval_step:
            self.evaluate(trainer, pl_module)  # step guard: gradient accumulation repeats a global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if trainer.global_step != self._last_eval_step:
                self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_eval_step:  # ended by max_epochs or a stop: measure the final model
            metrics = self.evaluate(trainer, pl_module, log=False)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, trainer.global_step)
        if trainer.is_global_zero and self.last_metrics:
            shown = " ".join(f"{self.prefix}/{k}={v:.4f}" for k, v in self.last_metrics.items())
            print(f"[ardiff judge] final (step {trainer.global_step}, {self.num_samples} samples): {shown}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    # ---- evaluation ----
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> dict[str, float]:
        """Generate, judge and log; must be called on every rank (sampling and metric sync are collective)."""
        start = time.perf_counter()
        self._last_eval_step = trainer.global_step
        plan, device = self.plan(pl_module), pl_module.device
        judge = self.setup_judge(trainer).to(device)
        if judge.num_classes != plan.num_classes:
            raise ValueError(
                f"the judge {self.judge_path} has {judge.num_classes} classes, the samples {plan.num_classes}"
            )
        ref = self.setup_reference(trainer)
        acc = MulticlassAccuracy(plan.num_classes, average="micro").to(device)
        moments = FeatureMoments(judge.num_features).to(device)
        with eval_mode(pl_module):
            chunks = iter_rank_chunks(
                pl_module.sample_images, plan, trainer.global_rank, trainer.world_size, device, **self.sample_kwargs
            )
            for k, images in chunks:  # images: (n, 3, H, W) uint8
                logits, features = judge(images, self.batch_size)
                acc.update(logits.argmax(1), plan.labels(plan.chunk_indices(k)).to(device))
                moments.update(features)
        metrics = {"class_acc": float(acc.compute()), "fd_judge": frechet_distance(moments.compute(), ref)}
        if log:
            for name, value in metrics.items():
                pl_module.log(f"{self.prefix}/{name}", value, prog_bar=True, sync_dist=False)
        self.last_metrics = metrics
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        took = time.perf_counter() - start
        if trainer.is_global_zero:
            print(f"[JudgeCallback] step {trainer.global_step}: {shown} ({plan.num_samples} samples, {took:.0f}s)")
        return metrics


# ------------------------------------------------------------------------------------------------ CLI
def main_train(argv: list[str] | None = None) -> int:
    """`ardiff judge train TRAIN_SHARDS [--val VAL_SHARDS] [--out PATH]`."""
    p = argparse.ArgumentParser(
        prog="ardiff judge train",
        description="Train a timm classifier judge (for val/class_acc and val/fd_judge) on labelled shards. "
        "Deterministic; written to <train shard dir>/judge_<arch>_<size>.pt (+ .json with its held-out accuracy); "
        "settings other than the defaults add -<hash> to the name.",
    )
    p.add_argument("train", help="train shards (folder, .tar or brace pattern) or npz with arr_0 + labels")
    p.add_argument("--val", help="held-out shards (default: a sibling `val` folder if present, else 10%% of train)")
    p.add_argument("--out", help="judge file (default: <train shard dir>/judge_<arch>_<size>.pt)")
    p.add_argument("--arch", default=SMALL_ARCH, help="timm architecture")
    p.add_argument("--model-kwargs", type=json.loads, help=f"timm create_model kwargs as JSON (default for "
                   f"{SMALL_ARCH}: {json.dumps(SMALL_KWARGS)})")  # fmt: skip
    p.add_argument("--image-size", type=int, default=32, help="center-crop shard images to this size")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--flip", action="store_true", help="random horizontal flips (never for digits or text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, help="train on the first N images only")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (1: fastest on a shared CPU)")
    p.add_argument("--force", action="store_true", help="retrain even if the judge file exists")
    a = p.parse_args(argv)
    kwargs = dict(arch=a.arch, model_kwargs=a.model_kwargs, image_size=a.image_size, epochs=a.epochs,
                  batch_size=a.batch_size, lr=a.lr, flip=a.flip, seed=a.seed, max_images=a.max_images,
                  threads=a.threads)  # fmt: skip
    out = a.out or default_judge_path(a.train, a.arch, a.image_size, kwargs)
    val = a.val
    if val is None and not a.train.endswith(".npz"):
        sibling = os.path.join(os.path.dirname(os.path.abspath(shard_dir(a.train))), "val")
        val = sibling if os.path.isdir(sibling) and os.path.abspath(sibling) != os.path.abspath(a.train) else None
    if os.path.isfile(out) and not a.force:
        if a.out is None:
            check_cached_judge(out, kwargs)
        info = json.loads(Path(out).with_suffix(".json").read_text()) if Path(out).with_suffix(".json").exists() else {}
        print(f"[ardiff judge] {out} exists (held-out accuracy {info.get('held_out_accuracy', math.nan):.4f}); "
              "--force retrains")  # fmt: skip
        return 0
    with file_lock(out):
        train_judge(a.train, out, val, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main_train())

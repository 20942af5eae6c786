"""Training logic shared by every generator: optimizer, lr schedule, EMA, non-finite loss policy,
fine-tune initialisation, FSDP2 sharding, and the standard training logs.

A subclass builds `self.net` (the trained `nn.Module`), calls `self.init_ema()`, and implements
`compute_loss(batch) -> (loss, logs)` and `sample_images(labels, generator)` (see docs/CONTRACT.md).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from models.checkpoint import CheckpointError, LoadReport, extract_state_dict, load_state_dict_strict, safe_torch_load


class NonFiniteLossError(RuntimeError):
    """Raised (on every rank) when the loss or the gradients are NaN/inf and `nan_policy="stop"`."""


class NonFiniteWeightsError(RuntimeError):
    """Raised (on every rank) instead of writing a checkpoint whose weights or optimizer state are NaN/inf."""


def lr_factor(
    step: int,
    warmup_steps: int,
    schedule: str,
    total_steps: int,
    decay_start_step: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    constant: linear warmup from 0, then 1 (MAR/TransDiff default, D-AR tokenizer).
    cosine:   linear warmup, then half-cosine from 1 to `min_lr_ratio` at `total_steps` (MAR `--lr_schedule cosine`).
    linear:   1 until `decay_start_step`, then linear to `min_lr_ratio` at `total_steps` (D-AR GPT: 300K -> 360K).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        if step < decay_start_step:
            return 1.0
        span = max(1, total_steps - decay_start_step)
        progress = min(1.0, (step - decay_start_step) / span)
        return 1.0 + (min_lr_ratio - 1.0) * progress
    raise ValueError(f"unknown lr schedule {schedule!r}: use constant, cosine or linear")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python) as checkpoint-safe tensors and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@contextmanager
def _unsharded(net: nn.Module) -> Iterator[None]:
    """Gather the full weights of every FSDP2 (`fully_shard`) module of `net` and keep them gathered through
    `forward` calls; no-op for a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in net.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    policy = [_reshards_after_forward(m) for m in sharded]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, after in zip(sharded, policy, strict=True):
            m.reshard()
            m.set_reshard_after_forward(after, recurse=False)


def _reshards_after_forward(m: nn.Module) -> bool:
    """The module's FSDP2 reshard-after-forward setting (True when it cannot be read)."""
    group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
    return True if group is None else group.post_forward_mesh_info is not None


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class GenerativeModule(L.LightningModule):
    """Base LightningModule of every ardiff generator.

    Args:
        lr: peak learning rate (used when `blr` is None).
        blr: base lr; when set, lr = blr * global_batch / 256 (the MAR/TransDiff rule).
        weight_decay: AdamW weight decay, applied to the parameters `no_weight_decay` does not exclude.
        betas, eps: AdamW.
        warmup_steps: linear warmup length in optimizer steps.
        lr_schedule: "constant" | "cosine" | "linear" (see `lr_factor`).
        decay_start_step: start of the linear decay window.
        total_steps: end of the decay window; None = the trainer's estimated stepping batches.
        min_lr: lr at the end of a cosine/linear schedule.
        ema_decay: EMA decay per optimizer step; None disables EMA.
        ema_start_step: the first `ema_start_step` updates copy the weights; later ones (all, with the default 0,
            as the official update_ema) blend.
        nan_policy: a non-finite loss (before backward) or non-finite gradients (after backward, before the
            optimizer): "stop" raises before anything is updated; "skip" drops that batch (no optimizer or EMA
            step; the step counter and lr schedule move on). Decided jointly across ranks. Either way a
            checkpoint with non-finite weights is never written (`NonFiniteWeightsError`).
        init_from: checkpoint to initialise the weights from when a run starts (fine-tuning): an ardiff
            Lightning checkpoint or an official one. Ignored when Lightning resumes from `ckpt_path`.
        init_use_ema: initialise the EMA copy from the EMA weights of `init_from` when it has them (`net` always
            takes the raw weights, as the official resume).
        init_strict: require an exact key/shape match; False loads what fits and reports the rest.
        compile: `torch.compile` the trained network.
    """

    def __init__(
        self,
        lr: float = 1e-4,
        blr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine", "linear"] = "constant",
        decay_start_step: int = 0,
        total_steps: int | None = None,
        min_lr: float = 0.0,
        ema_decay: float | None = 0.9999,
        ema_start_step: int = 0,
        nan_policy: Literal["stop", "skip"] = "stop",
        init_from: str | None = None,
        init_use_ema: bool = True,
        init_strict: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.lr, self.blr, self.weight_decay, self.betas, self.eps = lr, blr, weight_decay, tuple(betas), eps
        self.warmup_steps, self.lr_schedule, self.decay_start_step = warmup_steps, lr_schedule, decay_start_step
        self.total_steps, self.min_lr = total_steps, min_lr
        self.ema_decay, self.ema_start_step = ema_decay, ema_start_step
        self.nan_policy, self.compile_net = nan_policy, compile
        self.init_from, self.init_use_ema, self.init_strict = init_from, init_use_ema, init_strict
        self.init_report: LoadReport | None = None
        self.net: nn.Module
        self.ema_net: nn.Module | None = None
        self._tput_time: float | None = None
        self._tput_images = 0
        self._rng_to_restore: dict[str, Any] | None = None
        self._skip_step = False  # this batch's optimizer and EMA step are dropped (nan_policy=skip)
        self.schedule_steps: int | None = None  # length of the lr schedule (set by configure_optimizers)
        self._planned_schedule_steps: int | None = None  # schedule_steps before any TimeBudget decision

    # ------------------------------------------------------------------ subclass API
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss and extra scalars to log (under `train/`)."""
        raise NotImplementedError

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """True for parameters kept out of weight decay (default: biases and 1-D tensors such as norms)."""
        return param.ndim < 2 or name.endswith(".bias")

    def fsdp_blocks(self, net: nn.Module) -> list[nn.Module]:
        """The sub-modules that FSDP2 shards one by one: every element of every `nn.ModuleList` in `net`."""
        return [m for lst in net.modules() if isinstance(lst, nn.ModuleList) for m in lst]

    # ------------------------------------------------------------------ EMA
    def init_ema(self) -> None:
        """Create the EMA copy of `self.net` (call at the end of the subclass `__init__`)."""
        if self.ema_decay is not None:
            self.ema_net = copy.deepcopy(self.net).requires_grad_(False)

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema_net is None:
            return
        # global_step counts the updates before this one: with ema_start_step 0 the first update blends (official)
        decay = 0.0 if self.global_step < self.ema_start_step else self.ema_decay
        ema = [_local(p) for p in self.ema_net.parameters()]
        new = [_local(p.detach()) for p in self.net.parameters()]
        torch._foreach_lerp_(ema, new, 1.0 - decay)

    @contextmanager
    def sampling(self) -> Iterator[nn.Module]:
        """The network to sample with (the EMA copy when there is one), in eval mode for the duration.

        Under FSDP2 the weights are sharded and only a module's `forward` gathers them, while sampling calls other
        methods (and the root's own parameters) directly: every `fully_shard`-ed module is unsharded for the
        duration and resharded afterwards. These are collectives: every rank must sample (all ardiff sampling
        paths do, with the same number of calls)."""
        net = self.ema_net if self.ema_net is not None else self.net
        was_training = net.training
        net.eval()
        try:
            with _unsharded(net):
                yield net
        finally:
            net.train(was_training)

    # ------------------------------------------------------------------ fine-tuning
    def load_init_weights(self, path: str) -> LoadReport:
        """Initialise `net` and the EMA from an ardiff or official checkpoint, as the official resume does: the raw
        weights into `net`, the EMA weights (when the file has them and `init_use_ema`) into the EMA copy, else the
        raw ones. A file with only EMA weights initialises both from them. Returns what was loaded into `net`."""
        ckpt = safe_torch_load(path)
        if isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt:
            full = ckpt["state_dict"]
            section = lambda prefix: {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)} or None
            raw, ema = section("net."), section("ema_net.")
            if raw is None and ema is None:
                raise CheckpointError(f"{path}: no 'net.*' or 'ema_net.*' weights in this Lightning checkpoint")
        else:
            has = lambda keys: any(isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict) for k in keys)
            raw = extract_state_dict(ckpt, ("model", "state_dict")) if has(("model", "state_dict")) else None
            ema = extract_state_dict(ckpt, ("model_ema", "ema")) if has(("model_ema", "ema")) else None
            if raw is None and ema is None:
                raw = extract_state_dict(ckpt, ())  # a bare state dict (or a clear error)
        report = load_state_dict_strict(self.net, raw if raw is not None else ema, source=path, strict=self.init_strict)
        if self.ema_net is not None:
            self.ema_net.load_state_dict(self.net.state_dict())
            if self.init_use_ema and ema is not None and raw is not None:
                load_state_dict_strict(self.ema_net, ema, source=f"{path} (EMA)", strict=self.init_strict)
        return report

    def setup(self, stage: str) -> None:
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if stage == "fit" and self.init_from and not resuming and self.init_report is None:
            self.init_report = self.load_init_weights(self.init_from)
            rank_zero_info(f"[ardiff] initialised from {self.init_from}:\n{self.init_report.describe()}")

    # ------------------------------------------------------------------ RNG: decorrelated ranks, exact resume
    def on_fit_start(self) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None and self.trainer.world_size > 1:
            # every rank draws its own diffusion noise / timesteps / dropout (MAR seeds `seed + rank` too)
            torch.manual_seed(int(seed) + self.global_rank)
            np.random.seed((int(seed) + self.global_rank) % 2**32)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_checkpoint(checkpoint)
        state = rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["ardiff_rng"] = states  # one entry per rank

    def check_finite_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse (on every rank) to write weights, EMA or optimizer state holding NaN/inf: such a checkpoint
        would silently replace the last good one."""

        def non_finite(t: Any) -> bool:
            return isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(_local(t)).all())

        bad = next((f"weight {k!r}" for k, t in (checkpoint.get("state_dict") or {}).items() if non_finite(t)), None)
        for i, opt in enumerate(checkpoint.get("optimizer_states") or []):
            for pid, st in (opt.get("state", {}) if bad is None and isinstance(opt, dict) else {}).items():
                for name, t in st.items():
                    if non_finite(t):
                        bad = bad or f"optimizer {i} state {name!r} of parameter {pid}"
        any_bad = bad is not None
        if self._trainer is not None:
            any_bad = self.trainer.strategy.reduce_boolean_decision(any_bad, all=False)
        if any_bad:
            where = bad or "a tensor on another rank"
            raise NonFiniteWeightsError(
                f"refusing to write a checkpoint at global step {checkpoint.get('global_step', self.global_step)}: "
                f"{where} is NaN/inf, so training has diverged (the last checkpoint written is still intact). "
                "Resume from it with a lower lr, gradient clipping (trainer.gradient_clip_val), or "
                "model.init_args.nan_policy=skip."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("ardiff_rng")
        if states:
            rank = self.global_rank if self._trainer is not None else 0
            self._rng_to_restore = states[rank % len(states)]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # restored here, after the data iterator exists, so the next training step draws what it would have drawn
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ------------------------------------------------------------------ sharding / compile
    def configure_model(self) -> None:
        """Apply FSDP2 `fully_shard` per block (under `ModelParallelStrategy`), then optionally compile."""
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            dp_mesh = self.device_mesh["data_parallel"]
            # bf16 MixedPrecisionPolicy and reshard policy from FSDP2Strategy (trainer precision bf16-mixed)
            options = getattr(self.trainer.strategy, "fully_shard_kwargs", lambda root: {})
            for net in (self.net, self.ema_net):
                if net is None:
                    continue
                for block in self.fsdp_blocks(net):
                    fully_shard(block, mesh=dp_mesh, **options(root=False))
                fully_shard(net, mesh=dp_mesh, **options(root=True))
            self._sharded = True
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    # ------------------------------------------------------------------ optimisation
    def peak_lr(self) -> float:
        if self.blr is None:
            return self.lr
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            raise ValueError("blr needs the datamodule's batch_size to compute lr = blr * global_batch / 256")
        global_batch = batch * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return self.blr * global_batch / 256

    def lr_scale(self, name: str, param: nn.Parameter) -> float:
        """Multiplier of the lr (and its schedule) for one parameter (default 1)."""
        return 1.0

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.peak_lr()
        by_group: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                key = (self.no_weight_decay(name, p), self.lr_scale(name, p))
                by_group.setdefault(key, []).append(p)
        # (decay, scale 1) first, then (no decay, scale 1): param_groups[0] is the reference lr that gets logged
        groups = [
            {"params": ps, "weight_decay": 0.0 if no_wd else self.weight_decay, "lr": lr * scale}
            for (no_wd, scale), ps in sorted(by_group.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0][0]))
        ]
        params = [p for g in groups for p in g["params"]]
        decay = [p for (no_wd, _), ps in by_group.items() if not no_wd for p in ps]
        no_decay = [p for (no_wd, _), ps in by_group.items() if no_wd for p in ps]
        count = lambda ps: sum(p.numel() for p in ps)
        rank_zero_info(
            f"[ardiff] AdamW groups: {len(decay)} tensors with weight decay {self.weight_decay} ({count(decay):,} "
            f"parameters), {len(no_decay)} tensors without ({count(no_decay):,} parameters)"
            + (f"; lr scales {sorted({g['lr'] / lr for g in groups})}" if len(groups) > 2 and lr > 0 else "")
        )
        sharded = any(hasattr(p, "to_local") for p in params)
        fused = not sharded and all(p.device.type in ("cuda", "cpu") for p in params)
        opt = torch.optim.AdamW(groups, lr=lr, betas=self.betas, eps=self.eps, fused=fused)
        self._planned_schedule_steps = self.total_steps or int(self.trainer.estimated_stepping_batches)
        self.schedule_steps = self._planned_schedule_steps
        min_ratio = self.min_lr / lr if lr > 0 else 0.0

        def factor(step: int) -> float:  # reads schedule_steps at every step (TimeBudget may shorten the run)
            total = self.schedule_steps
            return lr_factor(step, self.warmup_steps, self.lr_schedule, total, self.schedule_decay_start, min_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def set_schedule_steps(self, max_steps: int) -> None:
        """The run now ends at `max_steps` (callbacks.time_budget.TimeBudget): a schedule that spans the trainer's
        length follows it, the linear decay's start scaled by the same ratio; an explicit `total_steps` is kept."""
        if self.total_steps is None:
            self.schedule_steps = max_steps

    @property
    def schedule_decay_start(self) -> int:
        """Start of the linear decay: `decay_start_step`, scaled by the ratio by which TimeBudget shortened the run."""
        planned, steps = self._planned_schedule_steps, self.schedule_steps
        if not planned or not steps or steps == planned:
            return self.decay_start_step
        return round(self.decay_start_step * steps / planned)

    # ------------------------------------------------------------------ training loop hooks
    def batch_size_of(self, batch: dict[str, Tensor]) -> int:
        return int(batch["label"].shape[0])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        self._skip_step = False
        loss, logs = self.compute_loss(batch)
        bad = torch.logical_not(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self._non_finite(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}, epoch "
                f"{self.current_epoch}; weights, optimizer and EMA were not updated with it.",
                "Lower the lr, check the data, or set model.init_args.nan_policy=skip to drop such batches.",
            )
            return None
        n = self.batch_size_of(batch)
        self._tput_images += n
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        for key, value in logs.items():
            self.log(f"train/{key}", value.detach() if isinstance(value, Tensor) else value, batch_size=n)
        return loss

    def _non_finite(self, msg: str, hint: str) -> None:
        """nan_policy for a non-finite loss or gradient (decided on all ranks): "stop" raises, "skip" marks this
        step so that neither the optimizer nor the EMA is updated."""
        if self.nan_policy == "stop":
            raise NonFiniteLossError(f"{msg} {hint}")
        rank_zero_info(f"[ardiff] {msg} Skipping the batch (nan_policy=skip).")
        self.log("train/skipped_batches", 1.0, on_step=True, reduce_fx="sum")
        self._skip_step = True

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self._skip_step:
            self.update_ema()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if norm is not None and hasattr(norm, "full_tensor"):  # FSDP2: the norm of the sharded grads, one value
            norm = norm.full_tensor()
        bad = norm is not None and not bool(torch.isfinite(norm))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            self._non_finite(
                f"non-finite gradients (norm {norm.item() if norm is not None else 'n/a'}) at global step "
                f"{self.global_step}, epoch {self.current_epoch} (the loss was finite); weights, optimizer and EMA "
                "were not updated with them.",
                "Lower the lr, clip gradients (trainer.gradient_clip_val), or set model.init_args.nan_policy=skip "
                "to drop such batches.",
            )
            for p in self.net.parameters():  # AdamW leaves parameters without a gradient untouched (no decay)
                p.grad = None
            return
        if not self._should_log():
            return
        if norm is not None:
            self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._should_log():
            return
        skipped = getattr(getattr(self.trainer, "datamodule", None), "num_skipped", None)
        if skipped is not None:  # corrupt samples / shards skipped by the data pipeline so far
            self.log("data/skipped_samples", float(skipped))
        now = time.perf_counter()
        if self._tput_time is not None and now > self._tput_time:
            ips = self._tput_images * self.trainer.world_size / (now - self._tput_time)
            self.log("train/images_per_sec", ips)
        self._tput_time, self._tput_images = now, 0

    def _should_log(self) -> bool:
        return self._trainer is not None and self.global_step % max(1, self.trainer.log_every_n_steps) == 0

"""FIDCallback: FID / IS (/ precision, recall) of class-balanced EMA samples, generated and measured on all ranks.

Every rank samples its share of the `SamplePlan` (see callbacks/sampling.py) and extracts Inception features locally
into a torchmetrics `IndexedFeatures` metric, whose `compute()` all-gathers them and puts them back in global index
order, so every rank computes the same metrics on exactly the requested N samples, whatever the world size. All
collectives run on every rank.
"""

import os
import time

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.inception import build_inception, extract_features
from callbacks.metrics import (
    IndexedFeatures,
    ReferenceStats,
    compute_metrics,
    inception_score,
    load_reference,
    stats_from_features,
)
from callbacks.sampling import SamplePlan, eval_mode, iter_rank_chunks
from datamodules.images import iter_images


class FIDCallback(L.Callback):
    """Log `{prefix}/fid`, `{prefix}/is` (and `/is_std`, `/precision`, `/recall`) every N epochs or steps of
    training, and at the end of `trainer.validate` / `trainer.test`.

    Args:
        reference: npz with reference statistics (`ardiff eval --write-ref`, or the ADM reference batch); None
            logs IS only. If the file does not exist and `reference_source` is "val", it is written on first use
            from the DataModule's validation shards (center-cropped to `image_size`; rank 0 extracts, all wait).
        num_samples: N generated images (50_000 for FID-50K); labels are class-balanced (`i * C // N`).
        chunk_size: images per `sample_images` call (per rank); part of the sample-set definition with `seed`.
        every_n_epochs / every_n_steps: training schedule (None disables either).
        sample_kwargs: passed to `pl_module.sample_images` (cfg scale, steps, temperature, ...).
        missing_weights: "error" (default) raises when no Inception weights can be found; "skip" warns (saying
            how to supply them) and turns the callback off, e.g. for demos on offline machines.
        inception_weights: path to torch-fidelity's Inception weights (else env var / hub cache / download).
    """

    def __init__(
        self,
        reference: str | None,
        num_samples: int = 50_000,
        chunk_size: int = 64,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        sample_kwargs: dict | None = None,
        inception_weights: str | None = None,
        inception_batch_size: int = 100,
        compute_is: bool = True,
        compute_pr: bool = False,
        prefix: str = "val",
        reference_source: str | None = "val",
        missing_weights: str = "error",
    ) -> None:
        super().__init__()
        self.reference = reference
        self.num_samples, self.chunk_size, self.seed, self.num_classes = num_samples, chunk_size, seed, num_classes
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.sample_kwargs = dict(sample_kwargs or {})
        self.inception_weights, self.inception_batch_size = inception_weights, inception_batch_size
        self.compute_is, self.compute_pr, self.prefix = compute_is, compute_pr, prefix
        self.reference_source = reference_source
        if missing_weights not in ("error", "skip"):
            raise ValueError(f"missing_weights must be 'error' or 'skip', got {missing_weights!r}")
        self.missing_weights = missing_weights
        self.disabled = False
        self.inception: torch.nn.Module | None = None  # kept here, not in the (possibly sharded) LightningModule
        self.ref: ReferenceStats | None = None
        self.last_metrics: dict[str, float] = {}
        self._last_eval_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.inception is None and not self.disabled:
            try:
                self.inception = build_inception(self.inception_weights)
            except FileNotFoundError as e:
                if self.missing_weights == "error":
                    raise
                self.disabled = True  # the same on every rank: each looks for the same file
                rank_zero_warn(f"FID/IS disabled for this run (missing_weights=skip): {e}")

    def plan(self, pl_module: L.LightningModule) -> SamplePlan:
        return SamplePlan(self.num_samples, self.num_classes or pl_module.num_classes, self.chunk_size, self.seed)

    # ---- schedule ----
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_eval_step:
            self.evaluate(trainer, pl_module)  # step guard: gradient accumulation repeats a global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if trainer.global_step != self._last_eval_step:
                self.evaluate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def write_reference_if_missing(self, trainer: L.Trainer) -> None:
        """Reference statistics of the DataModule's validation shards, written once to `self.reference`."""
        if os.path.exists(self.reference):
            return
        dm = trainer.datamodule
        shards = getattr(dm, "val_shards", None)
        if self.reference_source != "val" or not shards:
            raise FileNotFoundError(
                f"reference statistics {self.reference!r} not found; write them with `ardiff eval --write-ref "
                f"{self.reference} <val shards or folder> --image-size <res>`, or set reference_source: val"
            )
        if trainer.is_global_zero:  # the same reader as `ardiff eval --write-ref`
            pools = [
                extract_features(self.inception, batch, self.inception_batch_size)["pool"].cpu()
                for batch in iter_images(shards, self.inception_batch_size, getattr(dm, "image_size", None))
            ]
            os.makedirs(os.path.dirname(os.path.abspath(self.reference)), exist_ok=True)
            tmp = self.reference + ".tmp.npz"
            stats_from_features(torch.cat(pools)).save(tmp)
            os.replace(tmp, self.reference)
            rank_zero_info(f"[ardiff] wrote reference statistics of {shards} to {self.reference}")
        trainer.strategy.barrier("fid_reference")

    # ---- evaluation ----
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate, measure and log; must be called on every rank (sampling and gathering are collective)."""
        if self.disabled:
            return {}
        start = time.perf_counter()
        self._last_eval_step = trainer.global_step
        plan, device = self.plan(pl_module), pl_module.device
        self.inception = self.inception.to(device)
        if self.ref is None and self.reference is not None:
            self.write_reference_if_missing(trainer)
            self.ref = load_reference(self.reference, self.inception, self.compute_pr, self.inception_batch_size)

        features = IndexedFeatures({"pool": 2048, "logits": self.inception.fc.out_features}).to(device)
        features.update_empty()  # a rank can own no chunk when there are fewer chunks than ranks
        with eval_mode(pl_module):
            chunks = iter_rank_chunks(
                pl_module.sample_images, plan, trainer.global_rank, trainer.world_size, device, **self.sample_kwargs
            )
            for k, images in chunks:
                feats = extract_features(self.inception, images, self.inception_batch_size)
                features.update(plan.chunk_indices(k), pool=feats["pool"], logits=feats["logits"])
        gathered = features.compute(plan.num_samples)  # all-gather (collective), in sample-index order
        pool, logit = gathered["pool"], gathered["logits"]  # (N, 2048), (N, 1008) on CPU

        if self.ref is not None:
            metrics = compute_metrics(pool, logit if self.compute_is else None, self.ref, self.compute_pr)
        else:
            metrics = dict(zip(("is", "is_std"), inception_score(logit), strict=True))
        for name, value in metrics.items():
            pl_module.log(f"{self.prefix}/{name}", value, prog_bar=name in ("fid", "is"), sync_dist=False)
        self.last_metrics = metrics
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        took = time.perf_counter() - start
        rank_zero_info(f"[FIDCallback] step {trainer.global_step}: {shown} ({plan.num_samples} samples, {took:.0f}s)")
        return metrics

"""Training worker for the multi-process tests: `python -m tests.dist_worker --strategy ddp|fsdp2|single ...`.

Every run sees the same global batches: global batch i holds samples [i*G, (i+1)*G), and rank r of W takes the
r-th contiguous slice of it. So a W-process run and a single-process run with the same global batch G must give
the same losses and weights (to float tolerance). Stochastic losses (diffusion noise and timesteps, dropout) are
made comparable by seeding the RNG per (step, slice): rank r draws with seed (step, r), and the single-process
run computes its global-batch loss as the mean over the same W slices, each drawn with the same seed.
Rank 0 saves {"losses", "state", "global_step"} to --out.
"""

from __future__ import annotations

import argparse
import importlib
import json

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_modules.strategies import FSDP2Strategy, shutdown_distributed


class GlobalBatchSlices(Sampler[int]):
    def __init__(self, n: int, global_batch: int, rank: int, world: int, skip_batches: int = 0) -> None:
        self.n, self.g, self.rank, self.world, self.skip = n, global_batch, rank, world, skip_batches

    def __iter__(self):
        per = self.g // self.world
        skip, self.skip = self.skip, 0  # only the resumed epoch starts part-way
        for start in range(skip * self.g, self.n - self.g + 1, self.g):
            yield from range(start + self.rank * per, start + (self.rank + 1) * per)

    def __len__(self) -> int:
        return (self.n // self.g) * (self.g // self.world)


class SliceData(L.LightningDataModule):
    def __init__(self, dataset: Dataset, global_batch: int) -> None:
        super().__init__()
        self.dataset, self.global_batch = dataset, global_batch
        self.batch_size = global_batch  # per-rank batch is set in train_dataloader

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        self.batch_size = self.global_batch // world
        # a resumed run continues the epoch where it stopped (position derived from the restored global step)
        skip = self.trainer.global_step % (len(self.dataset) // self.global_batch)
        sampler = GlobalBatchSlices(len(self.dataset), self.global_batch, rank, world, skip)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)


class RecordLoss(L.Callback):
    """Global-batch loss per step: the mean of the ranks' losses (each rank's loss is a mean over its slice)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(float(loss))


def seeded_slices(cls: type, slices: int) -> type:
    """`cls` whose loss is the mean over `slices` equal slices of the batch, slice j drawn with RNG seed
    (step, slice id). Under W ranks each rank is one slice (id = its rank); in one process all W slices."""

    class Seeded(cls):
        def compute_loss(self, batch):
            world, rank = self.trainer.world_size, self.trainer.global_rank
            n = slices // world  # slices handled by this process
            size = batch["label"].shape[0] // n
            losses = []
            for j in range(n):
                torch.manual_seed(1_000 * self.global_step + rank * n + j)
                part = {k: v[j * size : (j + 1) * size] for k, v in batch.items()}
                losses.append(super().compute_loss(part)[0])
            return torch.stack(losses).mean(), {}

    Seeded.__name__ = Seeded.__qualname__ = f"Seeded{cls.__name__}"
    return Seeded


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], required=True)
    p.add_argument("--module", required=True, help="module:Class of the GenerativeModule")
    p.add_argument("--kwargs", default="{}", help="JSON init kwargs")
    p.add_argument("--dataset", required=True, help="module:function returning the Dataset")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-out", default=None, help="save a checkpoint at the end (sharded under fsdp2)")
    p.add_argument("--resume", default=None)
    a = p.parse_args()

    torch.manual_seed(0)
    model = seeded_slices(_load(a.module), slices=2)(**json.loads(a.kwargs))
    if a.strategy == "single":
        strategy, devices = "auto", 1
    elif a.strategy == "ddp":
        strategy, devices = "ddp", 2
    else:
        strategy, devices = FSDP2Strategy(), 2
    rec = RecordLoss()
    trainer = L.Trainer(
        max_steps=a.steps,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[rec],
    )
    trainer.fit(model, SliceData(_load(a.dataset)(), a.global_batch), ckpt_path=a.resume)
    if a.ckpt_out:
        trainer.save_checkpoint(a.ckpt_out)

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    # trained weights and their EMA; statistics buffers (e.g. codebook usage counts) are per-rank by design
    params = {name for name, _ in model.named_parameters()}
    state = {k: full(v).detach().float().clone() for k, v in model.state_dict().items() if k in params}
    if trainer.global_rank == 0:
        torch.save({"losses": rec.losses, "state": state, "global_step": trainer.global_step}, a.out)
    shutdown_distributed()


if __name__ == "__main__":
    main()

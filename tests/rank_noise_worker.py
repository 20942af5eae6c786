"""Worker for `test_rank_noise.py`: 2 CPU processes (gloo DDP) train the real tiny TransDiff for one step on the
SAME batch, seeded only the way a user's run is (`seed_everything`, i.e. the CLI's `seed_everything:`); nothing here
re-seeds per rank. Rank 0 saves every rank's first-step loss to --out.

    python -m tests.rank_noise_worker --out losses.pt
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.transdiff import TransDiffModule


class SameBatch(Dataset):
    """4 fixed images; every rank reads all of them (no distributed sampler), so only the noise can differ."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": torch.tensor(i % 4)}


class FirstLoss(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().reshape(1)
        gathered = [torch.zeros(1) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, loss)
        self.losses = torch.cat(gathered)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    L.seed_everything(0)
    model = TransDiffModule(arch="tiny", vae="identity", lr=1e-3, ema_decay=None)
    rec = FirstLoss()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[rec])  # fmt: skip
    trainer.fit(model, DataLoader(SameBatch(), batch_size=4))
    if trainer.global_rank == 0:
        torch.save({"losses": rec.losses}, a.out)


if __name__ == "__main__":
    main()

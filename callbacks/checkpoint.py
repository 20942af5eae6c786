"""`ModelCheckpoint` whose `last.ckpt` always holds the final step.

Lightning's `save_last=True` writes `last.ckpt` with each periodic save, and at the end of training only if no
`last.ckpt` was written before: a run of 1,300 steps with `every_n_train_steps: 500` ends with the step-1,000 weights
in `last.ckpt`, silently dropping the last 300 steps (which a fine-tune `init_from` or `ckpt_path=last` then uses).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's `ModelCheckpoint`; with `save_last`, training that ends between periodic saves writes its final
    step to `last.ckpt` too."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

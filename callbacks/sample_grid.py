"""SampleGridCallback: a TensorBoard grid of EMA samples for fixed classes, every N training steps and at train end.

Every rank samples the same small batch (a sharded FSDP2 model needs all ranks in its forward); rank 0 logs it.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from callbacks.sampling import eval_mode, to_uint8


class SampleGridCallback(L.Callback):
    """Log `samples/grid` (one row per class, `samples_per_class` columns) at `global_step`."""

    def __init__(
        self,
        every_n_steps: int = 1000,
        classes: list[int] | None = None,
        samples_per_class: int = 4,
        seed: int = 0,
        sample_kwargs: dict | None = None,
        tag: str = "samples/grid",
    ) -> None:
        super().__init__()
        self.every_n_steps, self.samples_per_class, self.seed, self.tag = every_n_steps, samples_per_class, seed, tag
        self.classes = list(classes) if classes is not None else None  # None: the first (up to) 10 classes
        self.sample_kwargs = dict(sample_kwargs or {})
        self._last_logged_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_logged_step:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_logged_step:
            self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample on every rank (same labels and seed everywhere); log from rank 0."""
        self._last_logged_step = trainer.global_step
        classes = self.classes if self.classes is not None else list(range(min(10, pl_module.num_classes)))
        labels = torch.tensor(classes, device=pl_module.device).repeat_interleave(self.samples_per_class)
        generator = torch.Generator().manual_seed(self.seed)  # same grid noise at every step
        with eval_mode(pl_module):
            images = to_uint8(pl_module.sample_images(labels, generator=generator, **self.sample_kwargs))  # (B,3,H,W)
        if trainer.is_global_zero:
            grid = make_grid(images.cpu(), nrow=self.samples_per_class, padding=2)  # (3, H', W') uint8
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(self.tag, grid, trainer.global_step)

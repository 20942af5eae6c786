"""Preemption safety: save `last.ckpt` when the job is told to stop, so `ckpt_path=last` resumes exactly there.

Lightning already turns SIGTERM into a clean stop after the current batch on every rank (`SIGTERMException`);
this callback adds the checkpoint at that point, and maps SIGUSR1 (the usual "time is almost up" signal of
schedulers other than SLURM's auto-requeue) to the same stop. Periodic step checkpoints stay the job of
`ModelCheckpoint(every_n_train_steps=..., save_last=True)`.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(Callback):
    """On SIGTERM (and SIGUSR1 outside SLURM auto-requeue) finish the batch, write `last.ckpt`, and exit.

    Args:
        dirpath: where to write; default the `ModelCheckpoint` folder, so `ckpt_path=last` finds it.
        filename: checkpoint file name.
        extra_signals: signal names treated like SIGTERM.
    """

    def __init__(
        self, dirpath: str | None = None, filename: str = "last.ckpt", extra_signals: tuple[str, ...] = ("SIGUSR1",)
    ):
        self.dirpath, self.filename, self.extra_signals = dirpath, filename, tuple(extra_signals)
        self.saved_path: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        for name in self.extra_signals:
            sig = getattr(signal, name)
            if slurm_requeue and sig == env.requeue_signal:
                continue  # Lightning's SLURM handler saves and requeues on it

            def stop(signum: int, frame: FrameType | None, trainer: L.Trainer = trainer) -> None:
                rank_zero_info(f"[ardiff] received {signal.Signals(signum).name}: stopping after this batch")
                trainer._signal_connector.received_sigterm = True

            signal.signal(sig, stop)

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        dirpath = self.dirpath
        if dirpath is None and trainer.checkpoint_callback is not None:
            dirpath = trainer.checkpoint_callback.dirpath
        return os.path.join(dirpath or trainer.default_root_dir, self.filename)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"[ardiff] preempted at step {trainer.global_step}: saved {path}; resume with ckpt_path=last")

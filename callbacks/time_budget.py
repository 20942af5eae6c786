"""Fit a run to a wall-clock budget: time the first training steps, then shorten `max_steps` and the lr schedule.

CPUs differ between machines (the 2-core development VMs ran the same demo step in 0.18 s and 0.30 s): a recipe
with a fixed step count cannot promise a wall time. `TimeBudget(minutes=...)` keeps the recipe's `max_steps` where
it fits and otherwise ends the run earlier with the whole lr schedule (warmup, cosine decay to `min_lr`) compressed
into the steps that fit, instead of cutting it off at a high lr as `Trainer(max_time=...)` would. It never lengthens
a run. The decision is taken on rank 0, broadcast, printed, and stored in the checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class TimeBudget(Callback):
    """Shorten the run so that its training loop ends within `minutes` of its first step.

    Args:
        minutes: wall-clock budget of the training loop (from the first training step; data preparation and setup
            before it are not counted; in-loop evaluation is, at its measured rate).
        start_step: steps run before timing starts (precision probe, first-epoch data start-up).
        measure_steps: steps timed to estimate the step time.
        round_to: the shortened `max_steps` is rounded down to a multiple of this (so that step-periodic checkpoints
            and grids line up with the last step).
    """

    def __init__(self, minutes: float, start_step: int = 10, measure_steps: int = 40, round_to: int = 100) -> None:
        if minutes <= 0 or start_step < 0 or measure_steps < 1 or round_to < 1:
            raise ValueError(
                f"TimeBudget needs minutes > 0, start_step >= 0, measure_steps >= 1, round_to >= 1; got {minutes}, "
                f"{start_step}, {measure_steps}, {round_to}"
            )
        self.minutes, self.start_step, self.measure_steps, self.round_to = minutes, start_step, measure_steps, round_to
        self.max_steps: int | None = None  # decided length (None: not yet measured)
        self.step_time: float | None = None
        self._t0: float | None = None  # first training step began
        self._t1: float | None = None  # timing window began
        self._first_step = 0

    # ---- apply -------------------------------------------------------------------------------------------------
    @staticmethod
    def planned_steps(trainer: L.Trainer) -> int:
        return trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop.max_steps = self.max_steps
        set_length = getattr(pl_module, "set_schedule_steps", None)
        if set_length is not None:
            set_length(self.max_steps)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._t1, self._first_step = None, None, trainer.global_step
        if self.max_steps is not None and self.max_steps < self.planned_steps(trainer):  # resumed: keep the decision
            self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.max_steps is not None:
            return
        done = trainer.global_step - self._first_step
        if done == self.start_step:
            self._t1 = time.perf_counter()
        elif done == self.start_step + self.measure_steps and self._t1 is not None:
            self._decide(trainer, pl_module, trainer.global_step)

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        now = time.perf_counter()
        step_time = (now - self._t1) / self.measure_steps
        remaining = self.minutes * 60 - (now - self._t0)
        planned = self.planned_steps(trainer)
        fits = step + max(0, math.floor(remaining / step_time))
        fits = max(step + 1, fits // self.round_to * self.round_to)
        decision = trainer.strategy.broadcast([min(planned, fits), step_time], src=0)  # rank 0 decides for all
        self.max_steps, self.step_time = int(decision[0]), float(decision[1])
        projected = (now - self._t0 + (planned - step) * step_time) / 60
        if self.max_steps < planned:
            self._apply(trainer, pl_module)
            verdict = f"training stops at step {self.max_steps} instead of {planned}, lr schedule compressed to match"
        else:
            verdict = f"all {planned} steps fit"
        rank_zero_info(
            f"[ardiff] TimeBudget: {self.step_time:.3f} s/step; {planned} steps would take {projected:.1f} min of "
            f"the {self.minutes:g}-min budget -> {verdict}"
        )

    # ---- checkpoint ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "step_time": self.step_time}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.max_steps, self.step_time = state_dict.get("max_steps"), state_dict.get("step_time")

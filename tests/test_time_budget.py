"""TimeBudget: the run is shortened to what fits the budget at the measured step time, the lr schedule is compressed
with it, and a resumed run keeps the decision. A fake clock advances 1 s per training step, so the figures are exact."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import callbacks.time_budget as time_budget
from callbacks.time_budget import TimeBudget
from tests.toy import ToyData, ToyGenerator


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TickPerStep(L.Callback):
    """Advances the fake clock by `seconds` during every training step; records the lr of every step."""

    def __init__(self, clock: FakeClock, seconds: float = 1.0) -> None:
        self.clock, self.seconds, self.lrs = clock, seconds, []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.clock.now += self.seconds


def _fit(tmp_path, clock, budget, max_steps, ckpt_path=None, seconds=1.0, callbacks=(), **schedule):
    tick = TickPerStep(clock, seconds)
    schedule = {"lr_schedule": "cosine", **schedule}
    model = ToyGenerator(lr=1e-2, warmup_steps=0, min_lr=0.0, ema_decay=None, **schedule)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[tick, budget, *callbacks], enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, ToyData(n=64, batch_size=8), ckpt_path=ckpt_path)
    return trainer, model, tick


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(time_budget.time, "perf_counter", c)
    return c


def test_run_is_cut_to_the_budget_and_the_schedule_compressed(tmp_path, clock):
    # 1 s per step; timed over steps 2..7; at step 7, 7 s are gone and 53 s remain: 7 + 53 = 60 steps fit
    budget = TimeBudget(minutes=1.0, start_step=2, measure_steps=5, round_to=10)
    trainer, model, tick = _fit(tmp_path, clock, budget, max_steps=200)
    assert budget.step_time == pytest.approx(1.0)
    assert budget.max_steps == 60 and trainer.global_step == 60 and len(tick.lrs) == 60
    # cosine from 1e-2 to 0 over 60 steps, not 200: halfway at step 30, by hand
    assert tick.lrs[30] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 30 / 60)))
    assert tick.lrs[59] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 59 / 60)))
    assert tick.lrs[5] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 5 / 200)))  # before the decision


def test_linear_decay_window_is_compressed_with_the_run(tmp_path, clock):
    # D-AR GPT schedule: constant, then linear to 0 from step 150 of 200. Cut to 60 steps, the decay starts at 45.
    budget = TimeBudget(minutes=1.0, start_step=2, measure_steps=5, round_to=10)
    trainer, model, tick = _fit(tmp_path, clock, budget, max_steps=200, lr_schedule="linear", decay_start_step=150)
    assert trainer.global_step == 60 and model.schedule_decay_start == 45
    assert tick.lrs[44] == pytest.approx(1e-2)
    assert tick.lrs[50] == pytest.approx(1e-2 * (1 - (50 - 45) / (60 - 45)))  # by hand
    assert tick.lrs[59] == pytest.approx(1e-2 * (1 - 14 / 15))


def test_a_run_that_fits_is_left_alone(tmp_path, clock):
    budget = TimeBudget(minutes=1.0, start_step=2, measure_steps=5, round_to=10)
    trainer, model, tick = _fit(tmp_path, clock, budget, max_steps=40)
    assert budget.max_steps == 40 and trainer.global_step == 40
    assert tick.lrs[20] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))


class SaveAt(L.Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_resume_keeps_the_decision(tmp_path, clock):
    path = tmp_path / "mid.ckpt"
    budget = TimeBudget(minutes=1.0, start_step=2, measure_steps=5, round_to=10)
    _, _, tick = _fit(tmp_path, clock, budget, max_steps=200, callbacks=[SaveAt(30, path)])
    state = torch.load(path, weights_only=True)["callbacks"]
    assert any(v == {"max_steps": 60, "step_time": 1.0} for v in state.values())
    # the recipe resumed at step 30 on a machine 10x slower: no new measurement, the run still ends at step 60
    again = TimeBudget(minutes=1.0, start_step=2, measure_steps=5, round_to=10)
    trainer2, model2, tick2 = _fit(tmp_path, clock, again, max_steps=200, ckpt_path=str(path), seconds=10.0)
    assert again.max_steps == 60 and trainer2.global_step == 60 and len(tick2.lrs) == 30
    assert tick2.lrs == pytest.approx(tick.lrs[30:60])


def test_bad_arguments():
    with pytest.raises(ValueError, match="minutes > 0"):
        TimeBudget(minutes=0)

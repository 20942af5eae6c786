"""The shared training logic: lr schedules, EMA, resume continuity, non-finite loss policy, fine-tuning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_modules.base import NonFiniteLossError, lr_factor
from models.checkpoint import CheckpointError
from tests.toy import ToyData, ToyGenerator


def _trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


def test_lr_factor_schedules():
    assert lr_factor(0, 10, "constant", 100) == 0.0
    assert lr_factor(5, 10, "constant", 100) == 0.5
    assert lr_factor(50, 10, "constant", 100) == 1.0
    # cosine: half way between warmup end and total -> 0.5 (min 0)
    assert lr_factor(55, 10, "cosine", 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, "cosine", 100, min_lr_ratio=0.1) == pytest.approx(0.1)
    # linear decay window (D-AR GPT: 300K -> 360K down to 1e-5 / 4e-4)
    r = 1e-5 / 4e-4
    assert lr_factor(299_999, 0, "linear", 360_000, 300_000, r) == 1.0
    assert lr_factor(330_000, 0, "linear", 360_000, 300_000, r) == pytest.approx((1 + r) / 2)
    assert lr_factor(360_000, 0, "linear", 360_000, 300_000, r) == pytest.approx(r)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(20, 10, "exp", 100)


def test_ema_follows_the_formula(tmp_path):
    torch.manual_seed(0)
    model = ToyGenerator(lr=1e-2, ema_decay=0.9)
    before = [p.detach().clone() for p in model.ema_net.parameters()]
    _trainer(tmp_path, 1).fit(model, ToyData())
    # one step: ema = 0.9 * ema0 + 0.1 * w1 (the first update blends too, as the official update_ema)
    for e, e0, w in zip(model.ema_net.parameters(), before, model.net.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * w)
    assert any(not torch.equal(b, a) for b, a in zip(before, model.ema_net.parameters(), strict=True))
    model.ema_start_step = 10  # global_step 1 < 10: the update copies
    model.update_ema()
    for e, w in zip(model.ema_net.parameters(), model.net.parameters(), strict=True):
        torch.testing.assert_close(e, w)


def test_resume_continues_step_schedule_ema_and_rng(tmp_path):
    def run(steps: int, ckpt: str | None = None, save: str | None = None) -> ToyGenerator:
        torch.manual_seed(0)
        m = ToyGenerator(lr=1e-2, warmup_steps=4, ema_decay=0.5, lr_schedule="cosine", total_steps=8, noise_std=0.5)
        t = _trainer(tmp_path, steps)
        t.fit(m, ToyData(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        assert t.global_step == steps
        return m

    straight = run(8)
    half = str(tmp_path / "half.ckpt")
    run(5, save=half)
    resumed = run(8, ckpt=half)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    opt = resumed.trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(8, 4, "cosine", 8))


def test_nan_loss_stops_with_clear_message_and_keeps_weights(tmp_path):
    torch.manual_seed(0)
    model = ToyGenerator(lr=1e-2, poison_step=2)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* global step 2.*nan_policy=skip"):
        _trainer(tmp_path, 5).fit(model, ToyData())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_loss_skip_policy_drops_the_batch(tmp_path):
    torch.manual_seed(0)
    model = ToyGenerator(lr=1e-2, poison_step=2, nan_policy="skip")
    _trainer(tmp_path, 5).fit(model, ToyData())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_from_reports_exactly_the_changed_keys(tmp_path):
    src = ToyGenerator(num_classes=4)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(src, ToyData())
    path = str(tmp_path / "src.ckpt")
    trainer.save_checkpoint(path)

    # same architecture: exact load; raw weights into net, EMA weights into the EMA copy (official resume)
    same = ToyGenerator(num_classes=4, init_from=path)
    report = same.load_init_weights(path)
    assert report.ok
    torch.testing.assert_close(same.net.head.weight, src.net.head.weight)
    torch.testing.assert_close(same.ema_net.head.weight, src.ema_net.head.weight)

    # a changed class embedding (fine-tune to 6 classes): strict fails naming the tensor, non-strict reports it
    changed = ToyGenerator(num_classes=6, init_from=path)
    with pytest.raises(CheckpointError, match=r"embed\.weight: file \(4, 16\) vs model \(6, 16\)"):
        changed.load_init_weights(path)
    changed.init_strict = False
    report = changed.load_init_weights(path)
    assert [k for k, _, _ in report.mismatched] == ["embed.weight"]
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(changed.net.head.weight, src.net.head.weight)
    torch.testing.assert_close(changed.ema_net.head.weight, src.ema_net.head.weight)


def test_blr_scales_with_global_batch(tmp_path):
    model = ToyGenerator(blr=1e-4)
    _trainer(tmp_path, 1, accumulate_grad_batches=2).fit(model, ToyData(batch_size=8))
    assert model.peak_lr() == pytest.approx(1e-4 * 16 / 256)
    assert not math.isnan(model.peak_lr())


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    from lightning_modules.base import rng_state, set_rng_state
    from models.checkpoint import safe_torch_load

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    path = tmp_path / "rng.pt"
    torch.save({"ardiff_rng": [rng_state()]}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(safe_torch_load(path)["ardiff_rng"][0])  # loads with weights_only: no pickled numpy objects
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]

"""last.ckpt holds the final step when training ends between periodic saves (Lightning's keeps the earlier one)."""

from __future__ import annotations

import lightning as L
import torch

from callbacks.checkpoint import ModelCheckpoint
from tests.toy import ToyData, ToyGenerator


def test_last_ckpt_is_the_final_step(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=5)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=7, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[ckpt],
    )  # fmt: skip
    model = ToyGenerator(lr=1e-2, ema_decay=None)
    trainer.fit(model, ToyData(n=64, batch_size=8))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in model.state_dict().items())

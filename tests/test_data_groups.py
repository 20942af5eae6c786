"""MRAR data: groups of distinct same-class images from shuffled shards, batched as (B, n, ...)."""

from __future__ import annotations

import webdataset as wds

from datamodules import DemoDataModule
from datamodules.webdataset import expand_shards, group_by_class


def test_group_by_class_yields_distinct_same_class_samples(demo_root):
    dm = DemoDataModule(root=str(demo_root), num_workers=0)
    dm.setup("fit")
    samples = wds.tariterators.tarfile_samples({"url": u} for u in expand_shards(dm.train_shards))
    groups = list(group_by_class(samples, 4))
    assert len(groups) >= 5000 // 4 - 10  # at most 3 leftovers per class are dropped
    for g in groups:
        assert len({int(s["cls"]) for s in g}) == 1
        assert len({s["__key__"] for s in g}) == 4


def test_grouped_batches_train_the_tiny_mrar_model(demo_root):
    from lightning_modules.transdiff import TransDiffModule

    dm = DemoDataModule(root=str(demo_root), num_workers=0, batch_size=6, group_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 4, 3, 32, 32) and batch["label"].shape == (6,)
    model = TransDiffModule(arch="tiny_mrar", vae="identity", ema_decay=None)
    loss, _ = model.compute_loss(batch)
    loss.backward()
    assert loss.isfinite() and model.net.encoder_blocks[0].attn.qkv.weight.grad is not None

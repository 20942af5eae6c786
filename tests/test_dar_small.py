"""D-AR small-data path: flip off / validation never flipped, the class count from the shards, codebook usage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules import WebDataModule
from datamodules.folder import ShardFolderDataModule, read_num_classes
from datamodules.shards import write_shards
from lightning_modules.dar import CodebookUsage, DARGPTModule

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lr_shards(tmp_path_factory) -> Path:
    """32 images of 3 classes, left half red, right half blue: a flip is visible in every image."""
    root = tmp_path_factory.mktemp("lr")
    for i in range(32):
        img = Image.new("RGB", (16, 16), (0, 0, 255))
        img.paste((255, 0, 0), (0, 0, 8, 16))
        folder = root / "images" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:03d}.png")
    write_shards(root / "images", root / "shards", prefix="train", maxcount=8, workers=0, progress=False)
    return root / "shards"


def flipped_fraction(loader) -> float:
    images = torch.cat([b["image"] for b in loader])  # (N, 3, H, W): red left unless flipped
    return (images[:, 0, :, 0] < 0).all(-1).float().mean().item()


@pytest.mark.parametrize("flip", [True, False])
def test_flip_option_and_validation_never_flipped(lr_shards: Path, flip: bool):
    dm = WebDataModule(train_shards=str(lr_shards), val_shards=str(lr_shards), image_size=16, batch_size=8,
                       num_workers=0, flip=flip)  # fmt: skip
    dm.setup("fit")
    frac = flipped_fraction(dm.train_dataloader())
    assert (0.2 < frac < 0.8) if flip else frac == 0.0
    assert flipped_fraction(dm.val_dataloader()) == 0.0


def test_class_count_from_the_shards(lr_shards: Path, tmp_path: Path):
    assert json.loads((lr_shards / "class_index.json").read_text()) == {"class0": 0, "class1": 1, "class2": 2}
    assert read_num_classes(str(lr_shards)) == 3
    dm = ShardFolderDataModule(str(lr_shards), image_size=16, batch_size=8, num_workers=0)
    assert dm.num_classes == 3 and dm.val_shards == str(lr_shards) and dm.flip is False
    assert ShardFolderDataModule(str(lr_shards), num_classes=7).num_classes == 7
    with pytest.raises(FileNotFoundError, match="class_index.json"):
        ShardFolderDataModule(str(tmp_path))
    # the GPT takes the count from the DataModule and stores it for checkpoints
    module = DARGPTModule(gpt="tiny", classes_from_data=True, ema_decay=None)
    assert not hasattr(module, "net")
    module.trainer = type("T", (), {"datamodule": dm, "ckpt_path": None})()  # the two attributes setup reads
    module.setup("fit")
    assert module.num_classes == 3 and module.net.cls_embedding.embedding_table.weight.shape[0] == 4  # + null class
    assert module.hparams["gpt_overrides"] == {"num_classes": 3}


def test_codebook_usage_metric():
    metric = CodebookUsage(8)
    metric.update(torch.tensor([[0, 0, 1, 1]]))
    metric.update(torch.tensor([[2, 2, 2, 2]]))
    used, perplexity = metric.compute()
    p = torch.tensor([0.25, 0.25, 0.5])  # hand-computed histogram
    assert used == 3 and math.isclose(perplexity.item(), math.exp(-(p * p.log()).sum().item()), rel_tol=1e-6)


def test_tokenizer_validation_metrics_equal_direct_computation():
    from lightning_modules.dar import DARTokenizerModule

    torch.manual_seed(0)
    module = DARTokenizerModule(config="tiny", lpips_weight=0, repa_weight=0, recon_every_n_steps=0)
    module.validation_lpips = lambda: None  # PSNR/SSIM/codes only (no VGG16 weights offline)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    module.on_validation_epoch_start()
    module.validation_step({"image": x, "label": torch.zeros(4, dtype=torch.long)}, 0)
    with module.sampling() as net:
        ids = net.encode_tokens(x)
        rec = net.decode_tokens(ids, torch.Generator().manual_seed(0)).clamp(-1, 1)
    mse = ((rec - x) ** 2).mean()
    assert math.isclose(module.recon_metrics["psnr"].compute().item(), 10 * math.log10(4 / mse.item()), rel_tol=1e-5)
    used, _ = module.recon_metrics["codes"].compute()
    assert used == len(set(ids.flatten().tolist()))

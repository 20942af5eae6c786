"""Training crops as the official recipes: ADM random crop (D-AR tokenizer), random short-side square (TransDiff
MRAR), one of TenCrop's crops of the 1.1x center crop (D-AR GPT); ADM center crop elsewhere and for validation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import WebDataModule
from datamodules.shards import write_shards
from datamodules.transforms import center_crop_arr, random_crop_arr, random_square_crop, ten_crop_choice, to_tensor


def coords(w: int, h: int) -> Image.Image:
    """Pixel (x, y) = (x, y, 0): a crop's offset can be read off its first pixel."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def offsets(crop, img: Image.Image, size: int, n: int = 200) -> set[tuple[int, int]]:
    seen = set()
    for i in range(n):
        out = np.asarray(crop(img, size, random.Random(i))).astype(int)
        x0, y0 = out[0, 0, :2]
        assert out.shape == (size, size, 3)
        assert np.array_equal(out, np.asarray(img).astype(int)[y0 : y0 + size, x0 : x0 + size])  # an exact crop
        seen.add((int(x0), int(y0)))
    return seen


def test_ten_crop_draws_the_five_torchvision_positions():
    # a 110 px square is its own 1.1 x 100 center crop: crops at the corners and the (rounded) center
    assert offsets(ten_crop_choice, coords(110, 110), 100) == {(0, 0), (10, 0), (0, 10), (10, 10), (5, 5)}


def test_square_crop_takes_a_random_short_side_square():
    seen = offsets(random_square_crop, coords(150, 100), 100)  # side 100 = the output size: no resize
    assert {y for _, y in seen} == {0} and len(seen) > 20 and all(0 <= x <= 50 for x, _ in seen)


def test_adm_random_crop_offsets_and_scale():
    crop = lambda img, size, rng: random_crop_arr(img, size, rng, min_frac=1.0)  # short side = size: no rescale
    seen = offsets(crop, coords(150, 100), 100)
    assert {y for _, y in seen} == {0} and len(seen) > 20


def test_datamodule_crop_option(tmp_path: Path):
    folder = tmp_path / "images" / "c0"
    folder.mkdir(parents=True)
    src = coords(60, 40)
    src.save(folder / "img.png")
    write_shards(tmp_path / "images", tmp_path / "shards", prefix="train", maxcount=10, workers=0, progress=False)
    kw = dict(train_shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), image_size=16,
              batch_size=1, num_workers=0)  # fmt: skip
    big = center_crop_arr(src, 17)
    five = [big.crop((x, y, x + 16, y + 16)) for x, y in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0)]]
    dm = WebDataModule(crop="ten", flip=False, **kw)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))["image"][0]
    assert any(torch.equal(train, to_tensor(c)) for c in five)
    val = next(iter(dm.val_dataloader()))["image"][0]
    assert torch.equal(val, to_tensor(center_crop_arr(src, 16)))  # validation: ADM center crop, unflipped
    with pytest.raises(ValueError, match="crop must be one of"):
        WebDataModule(crop="corner", **kw)

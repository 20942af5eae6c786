"""Your own data in one argument: the output folder of `ardiff data write-shards DIR OUT`.

    ardiff data write-shards my_images/ shards/mine          # my_images/<class>/*.png, any size
    ardiff fit -c experiments/transdiff/small.yaml --data.init_args.shards shards/mine

`OUT` may hold the shards directly (then validation reads the same shards, i.e. training images, unless
`val_shards` is given) or `OUT/train` and `OUT/val` (two write-shards runs, the second with
`--class-index OUT/train/class_index.json`). The class count comes from the `class_index.json` that write-shards
puts next to the training shards.
"""

from __future__ import annotations

import json
import os
from typing import Any

from datamodules.images import shard_dir
from datamodules.webdataset import WebDataModule


def read_num_classes(shards: str) -> int:
    """Number of classes from the `class_index.json` that `ardiff data write-shards` writes next to the shards
    (`shards`: their folder or a pattern/list inside it)."""
    path = os.path.join(shard_dir(shards), "class_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: write the shards with `ardiff data write-shards DIR OUT` (it writes the class index), "
            "or give the class count with --data.init_args.num_classes N"
        )
    try:
        with open(path) as f:
            labels = [int(v) for v in json.load(f).values()]
    except (ValueError, AttributeError) as exn:
        raise ValueError(f"{path}: expected a JSON object {{class name: index}} ({exn})") from exn
    if not labels:
        raise ValueError(f"{path} lists no classes")
    return max(labels) + 1


class ShardFolderDataModule(WebDataModule):
    """`WebDataModule` over one write-shards output folder (see the module docstring).

    Args:
        shards: the folder (with the `.tar` files, or with `train/` and `val/` subfolders), or a shard pattern.
        val_shards: validation shards (the judge's / FID's reference images); default `shards/val` if it exists,
            else the training shards.
        num_classes: default: from `class_index.json` next to the training shards.
        flip: random horizontal flip of training images (default off: digits, text and most small data sets are
            orientation-bound); validation is never flipped.
        Everything else as `WebDataModule` (batch_size, num_workers, shuffle_buffer, crop, ...).
    """

    def __init__(
        self,
        shards: str,
        val_shards: str | None = None,
        num_classes: int | None = None,
        image_size: int = 32,
        flip: bool = False,
        batch_size: int = 64,
        num_workers: int = 1,
        **kwargs: Any,
    ) -> None:
        split = os.path.isdir(os.path.join(shards, "train"))
        train = os.path.join(shards, "train") if split else shards
        default_val = os.path.join(shards, "val") if split and os.path.isdir(os.path.join(shards, "val")) else train
        super().__init__(
            train_shards=train, val_shards=val_shards or default_val, image_size=image_size,
            num_classes=num_classes or read_num_classes(train), flip=flip, batch_size=batch_size,
            num_workers=num_workers, **kwargs,
        )  # fmt: skip
        self.shards = shards

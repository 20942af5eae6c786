"""Your own data in one argument: the output folder of `ardiff data write-shards DIR OUT`.

    ardiff data write-shards my_images/ shards/mine          # my_images/<class>/*.png, any size
    ardiff fit -c experiments/dar/small_tokenizer.yaml --data.shards shards/mine

`OUT` may hold the shards directly (then validation reads the first batches of the same shards, i.e. training
images) or `OUT/train` and `OUT/val` (two write-shards runs, the second with
`--class-index OUT/train/class_index.json`).
The class count comes from the `class_index.json` that write-shards puts next to the training shards.
"""

from __future__ import annotations

import json
import os
from typing import Any

from datamodules.webdataset import WebDataModule


def num_classes_of(shards: str) -> int:
    """The class count of a write-shards output folder (`class_index.json`: class name -> index)."""
    path = os.path.join(shards, "class_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: `ardiff data write-shards` writes it next to the shards; or set data.num_classes"
        )
    with open(path) as f:
        index = json.load(f)
    if not isinstance(index, dict) or not index:
        raise ValueError(f"{path}: expected a non-empty JSON object class name -> index")
    return max(int(v) for v in index.values()) + 1


class ShardFolderDataModule(WebDataModule):
    """`WebDataModule` over one write-shards output folder (see the module docstring).

    Args:
        shards: the folder (with the `.tar` files, or with `train/` and `val/` subfolders).
        num_classes: default: from `class_index.json`.
        flip: random horizontal flip of training images (default off: digits, text and most small data sets are
            orientation-bound).
        Loader settings as `WebDataModule` (batch_size, num_workers, shuffle_buffer, ...).
    """

    def __init__(
        self,
        shards: str,
        num_classes: int | None = None,
        image_size: int = 32,
        flip: bool = False,
        batch_size: int = 64,
        num_workers: int = 1,
        **kwargs: Any,
    ) -> None:
        split = os.path.isdir(os.path.join(shards, "train"))
        train = os.path.join(shards, "train") if split else shards
        val = os.path.join(shards, "val") if split and os.path.isdir(os.path.join(shards, "val")) else train
        kwargs["val_shards"] = kwargs.get("val_shards") or val
        super().__init__(
            train_shards=train, image_size=image_size, num_classes=num_classes or num_classes_of(train),
            flip=flip, batch_size=batch_size, num_workers=num_workers, **kwargs,
        )  # fmt: skip
        self.shards = shards

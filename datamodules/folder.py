"""Your own data: the shards of one ImageFolder (`ardiff data write-shards DIR OUT`), class count read from them.

ardiff data write-shards my_images/ shards/mine
ardiff fit -c experiments/transdiff/small.yaml --data.init_args.shards shards/mine
"""

import json
import os
from typing import Any

from datamodules.images import shard_dir
from datamodules.webdataset import WebDataModule


def read_num_classes(shards: str) -> int:
    """Number of classes from the `class_index.json` that `ardiff data write-shards` writes next to the shards."""
    path = os.path.join(shard_dir(shards), "class_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: write the shards with `ardiff data write-shards DIR OUT` (it writes the class index), "
            "or give the class count with --data.init_args.num_classes N"
        )
    try:
        index = json.loads(open(path).read())
        labels = [int(v) for v in index.values()]
    except (ValueError, AttributeError) as exn:
        raise ValueError(f"{path}: expected a JSON object {{class name: index}} ({exn})") from exn
    if not labels:
        raise ValueError(f"{path} lists no classes")
    return max(labels) + 1


class ShardFolderDataModule(WebDataModule):
    """`WebDataModule` over the shards of one image folder.

    Args:
        shards: the folder (or pattern) written by `ardiff data write-shards`; trained on.
        val_shards: validation shards (reference images of the judge / FID); default: `shards` itself.
        num_classes: default: read from `class_index.json` next to `shards`.
        Everything else as `WebDataModule` (image_size, batch_size, flip, ...).
    """

    def __init__(
        self, shards: str, val_shards: str | None = None, num_classes: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(
            train_shards=shards,
            val_shards=val_shards or shards,
            num_classes=num_classes or read_num_classes(shards),
            **kwargs,
        )

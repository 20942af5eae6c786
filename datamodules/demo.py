"""Built-in demo data: procedurally generated class-conditional coloured shapes (no download).

Each class is a shape (circle, square, triangle, star, ring, cross, rhombus, hexagon, crescent, heart; beyond 10
classes the shapes repeat) in a colour of its own (hue label/num_classes, slightly jittered; random saturation and
brightness) at a random position, scale and rotation over a random textured background (smooth noise, gradient or
stripes). Images are rendered deterministically
from (seed, split, class, index), written as a PNG ImageFolder and then through the real shard writer.

    ardiff data demo --out data/demo --size 32 --train-per-class 500 --val-per-class 50
"""

import argparse
import colorsys
import fcntl
import functools
import json
import math
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.shards import write_shards
from datamodules.webdataset import WebDataModule

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "rhombus", "hexagon", "crescent", "heart")
SPLIT_IDS = {"train": 0, "val": 1}


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float) -> np.ndarray:
    """Regular polygon as an intersection of half-planes (one vertex pointing up)."""
    inside = np.ones_like(u, dtype=bool)
    for k in range(sides):
        a = math.pi / 2 + math.pi / sides + 2 * math.pi * k / sides
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in shape coordinates (radius ~1, v pointing up)."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return _polygon(u, v, 3, 0.5)
    if shape == "star":
        return r <= 0.42 + 0.58 * (0.5 + 0.5 * np.cos(5 * (theta - math.pi / 2))) ** 3
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.6)
    if shape == "cross":
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 1.0))
    if shape == "rhombus":
        return np.abs(u) / 0.55 + np.abs(v) <= 1.0
    if shape == "hexagon":
        return _polygon(u, v, 6, 0.87)
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)
    if shape == "heart":
        x, y = 1.25 * u, 1.25 * v + 0.15
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, n: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, n, 3) float in [0, 1]: smooth noise, a linear gradient, or stripes between two muted colours."""
    c1 = _hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.15, 0.6))
    c2 = _hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.15, 0.6))
    kind = rng.integers(3)
    if kind == 0:  # smooth value noise: a random 5x5 grid upsampled bilinearly, plus fine grain
        grid = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8)).resize((n, n), Image.BILINEAR)
        t = np.asarray(grid, dtype=np.float32) / 255 + rng.standard_normal((n, n), dtype=np.float32) * 0.05
    elif kind == 1:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * math.pi)
        t = 0.5 + 0.5 * (x * math.cos(a) + y * math.sin(a)) / math.sqrt(2)
    else:  # stripes of random frequency and direction
        a, freq = rng.uniform(0, math.pi), rng.uniform(3, 8)
        t = 0.5 + 0.5 * np.sin(freq * math.pi * (x * math.cos(a) + y * math.sin(a)))
    t = np.clip(t, 0, 1)[..., None]
    return (1 - t) * c1 + t * c2


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], (n, n) each, y pointing up."""
    t = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    return np.broadcast_to(t[None, :], (n, n)), np.broadcast_to(-t[:, None], (n, n))


def render_shape_image(
    label: int, num_classes: int, size: int, rng: np.random.Generator, supersample: int = 4
) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `label`, anti-aliased by rendering at `supersample`x."""
    n = size * supersample
    x, y = _grid(n)
    img = _background(rng, n, x, y)
    radius = rng.uniform(0.35, 0.7)
    cx, cy = rng.uniform(-1 + radius, 1 - radius, size=2)
    rot = rng.uniform(0, 2 * math.pi)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u, v = dx * math.cos(rot) + dy * math.sin(rot), -dx * math.sin(rot) + dy * math.cos(rot)
    mask = shape_mask(SHAPES[label % len(SHAPES)], u, v)[..., None]
    hue = (label + rng.uniform(-0.2, 0.2)) / num_classes  # the class's own hue: shape and colour identify it
    color = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    shade = 1.0 - 0.25 * (u + v).clip(-1, 1)[..., None] * 0.5  # soft light from the top-left
    img = np.where(mask, color * shade, img)
    img = img.astype(np.float32).reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # box filter
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def class_names(num_classes: int) -> list[str]:
    width = len(str(num_classes - 1))
    return [f"{c:0{width}d}_{SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]


def _render_class(job: tuple) -> None:
    """Write the PNGs of one class of one split."""
    root, split, label, num_classes, size, per_class, seed = job
    name = class_names(num_classes)[label]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], label, i])
        arr = render_shape_image(label, num_classes, size, rng, supersample=max(1, 64 // size))
        Image.fromarray(arr).save(folder / f"{name}_{i:05d}.png")


def make_demo_data(
    out: str | Path,
    num_classes: int = 10,
    image_size: int = 32,
    train_per_class: int = 500,
    val_per_class: int = 50,
    seed: int = 0,
    num_train_shards: int = 32,
    num_val_shards: int = 8,
    progress: bool = True,
) -> Path:
    """Render the demo ImageFolder to `out/images/{train,val}` and shard it to `out/shards/{train,val}`.
    Idempotent and safe to call from many processes: the first one writes (under a file lock), the rest wait."""
    out = Path(out)
    done = out / "DONE"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():  # written by another process while we waited for the lock
            return out
        names = class_names(num_classes)
        splits = {"train": (train_per_class, num_train_shards), "val": (val_per_class, num_val_shards)}
        for split, (per_class, num_shards) in splits.items():
            jobs = [(out / "images" / split, split, label, num_classes, image_size, per_class, seed)
                    for label in range(num_classes)]  # fmt: skip
            workers = min(os.cpu_count() or 1, num_classes)
            with mp.get_context("fork").Pool(workers) as pool:
                done_jobs = pool.imap_unordered(_render_class, jobs)
                for _ in tqdm(done_jobs, total=len(jobs), desc=f"demo {split}", unit="class", disable=not progress):
                    pass
            write_shards(
                out / "images" / split,
                out / "shards" / split,
                prefix=split,
                maxcount=math.ceil(num_classes * per_class / num_shards),
                seed=seed,
                workers=0,
                progress=progress,
            )
        config = dict(num_classes=num_classes, image_size=image_size, train_per_class=train_per_class,
                      val_per_class=val_per_class, seed=seed, classes=names)  # fmt: skip
        done.write_text(json.dumps(config, indent=1))
    return out


def demo_subdir(num_classes: int, image_size: int, train_per_class: int, val_per_class: int, seed: int) -> str:
    """Folder name under the demo root, keyed by every setting that changes the data."""
    return f"shapes2-{image_size}-c{num_classes}-n{train_per_class}-{val_per_class}-s{seed}"


class DemoDataModule(WebDataModule):
    """`WebDataModule` over the built-in shapes data, generated on first use under `root` (keyed by its settings)."""

    def __init__(
        self,
        root: str = "data/demo",
        num_classes: int = 10,
        image_size: int = 32,
        train_per_class: int = 500,
        val_per_class: int = 50,
        data_seed: int = 0,
        num_train_shards: int = 32,
        num_val_shards: int = 8,
        batch_size: int = 64,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        **kwargs: Any,
    ):
        """Demo settings here; loader settings (shuffle_buffer, seed, resampled, group_size, ...) as `WebDataModule`."""
        self.demo_dir = Path(root) / demo_subdir(num_classes, image_size, train_per_class, val_per_class, data_seed)
        self.demo_kwargs = dict(num_classes=num_classes, image_size=image_size, train_per_class=train_per_class,
                                val_per_class=val_per_class, seed=data_seed, num_train_shards=num_train_shards,
                                num_val_shards=num_val_shards)  # fmt: skip
        super().__init__(
            train_shards=str(self.demo_dir / "shards" / "train"),
            val_shards=str(self.demo_dir / "shards" / "val"),
            kind="image", image_size=image_size, num_classes=num_classes, batch_size=batch_size,
            num_workers=num_workers, prefetch_factor=prefetch_factor, **kwargs,
        )  # fmt: skip

    def prepare_data(self) -> None:
        make_demo_data(self.demo_dir, **self.demo_kwargs)

    def setup(self, stage: str | None = None) -> None:
        make_demo_data(self.demo_dir, **self.demo_kwargs, progress=False)  # no-op once written; waits on the lock
        super().setup(stage)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ardiff data demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default: where DemoDataModule(root='data/demo') looks)")
    p.add_argument("--size", type=int, default=32, help="image resolution")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--train-shards", type=int, default=32, help="number of train shards")
    p.add_argument("--val-shards", type=int, default=8, help="number of val shards")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = a.out or Path("data/demo") / demo_subdir(a.classes, a.size, a.train_per_class, a.val_per_class, a.seed)
    out = make_demo_data(out, a.classes, a.size, a.train_per_class, a.val_per_class, a.seed, a.train_shards,
                         a.val_shards)  # fmt: skip
    print(f"demo data in {out}: train shards {out / 'shards' / 'train'}, val shards {out / 'shards' / 'val'}")
    return 0

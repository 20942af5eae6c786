"""Images/s of WebDataModule (decode + ADM center crop + flip + collate) vs. torchvision ImageFolder + PIL.

Both read the same synthetic JPEGs (default 1000 at 400x350, in a temp dir), crop to 256, random flip, normalise
to [-1, 1], batch 64, with the same number of DataLoader workers. One untimed warm-up epoch, then timed epochs.

    python benchmarks/data_throughput.py --images 1000 --workers 2 --json data_throughput.json
"""

import argparse
import functools
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from datamodules import WebDataModule
from datamodules.shards import write_shards
from datamodules.transforms import center_crop_arr


def make_jpegs(root: Path, n: int, width: int, height: int, classes: int = 10) -> None:
    """Photo-like JPEGs: smooth random colour fields plus grain (pure noise would be unrealistically slow to decode)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        arr = np.asarray(low, dtype=np.int16) + rng.integers(-12, 12, (height, width, 3), dtype=np.int16)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=90)


def time_loader(loader, epochs: int) -> tuple[float, int]:
    """Images/s over `epochs` timed epochs after one warm-up epoch (also starts persistent workers)."""
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            count += images.shape[0]
    return count / (time.perf_counter() - start), count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=350)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs")
    p.add_argument("--json", default="data_throughput.json", help="where to write the results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "images", args.images, args.width, args.height)
        write_shards(tmp / "images", tmp / "shards", prefix="bench", maxcount=100, workers=0, progress=False)

        dm = WebDataModule(train_shards=str(tmp / "shards"), image_size=args.image_size, batch_size=args.batch_size,
                           num_workers=args.workers, shuffle_buffer=1000, pin_memory=False)  # fmt: skip
        dm.setup("fit")
        wds_rate, n = time_loader(dm.train_dataloader(), args.epochs)

        tf = transforms.Compose([
            functools.partial(center_crop_arr, image_size=args.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ])  # fmt: skip
        folder = datasets.ImageFolder(str(tmp / "images"), transform=tf)
        loader = DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            persistent_workers=args.workers > 0)  # fmt: skip
        folder_rate, _ = time_loader(loader, args.epochs)

    results = {
        "images": args.images,
        "source_size": [args.width, args.height],
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "timed_images": n,
        "webdatamodule_img_per_s": round(wds_rate, 1),
        "imagefolder_img_per_s": round(folder_rate, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
    }
    print(f"| loader ({args.workers} workers, {args.width}x{args.height} JPEG -> {args.image_size}) | images/s |")
    print("|---|---|")
    print(f"| WebDataModule (shards) | {wds_rate:.0f} |")
    print(f"| torchvision ImageFolder + PIL | {folder_rate:.0f} |")
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

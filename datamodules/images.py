"""Read whole image sets in a fixed order, for evaluation (reference statistics, judges): an ADM npz, an image folder,
or WebDataset shards. Shared by `ardiff eval` and the evaluation callbacks (which must not import the CLI).

    iter_images(source, batch_size, image_size)          -> uint8 (B,3,H,W) batches
    iter_labeled_images(source, batch_size, image_size)  -> (uint8 (B,3,H,W), int64 (B,)) batches
"""

import os
from collections.abc import Iterator
from glob import glob

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from datamodules.transforms import IMAGE_FIELDS, center_crop_arr, decode_image, image_bytes
from datamodules.webdataset import expand_shards


def is_shards(source: str | list[str]) -> bool:
    if not isinstance(source, str):  # a list of shard specs, as WebDataModule accepts
        return True
    return source.endswith(".tar") or "{" in source or (os.path.isdir(source) and bool(glob(f"{source}/*.tar")))


def shard_dir(source: str | list[str]) -> str:
    """The folder holding the (first) shards of `source` (a folder, a .tar file, a brace pattern or a list)."""
    if isinstance(source, str) and os.path.isdir(source):
        return source
    return os.path.dirname(expand_shards(source)[0]) or "."


def nhwc_to_nchw(images: np.ndarray) -> Tensor:
    """ADM layout (N,H,W,3) uint8 -> (N,3,H,W) uint8 tensor."""
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, (images.dtype, images.shape)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def _pil_to_uint8(img: Image.Image, image_size: int | None) -> np.ndarray:
    img = center_crop_arr(img.convert("RGB"), image_size) if image_size else img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)  # (H, W, 3)


def _stack(arrays: list[np.ndarray], source: str) -> np.ndarray:
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"{source}: images of different sizes; pass --image-size to center-crop them to one size")
    return np.stack(arrays)


def _iter_arrays(source: str, image_size: int | None, labels: bool) -> Iterator[tuple[np.ndarray, int]]:
    """(H,W,3) uint8 array and label (-1 when `labels` is False) of each image of a folder or shards."""
    if is_shards(source):
        for s in wds.tariterators.tarfile_samples({"url": u} for u in expand_shards(source)):
            if labels and "cls" not in s:
                raise KeyError(f"{source}: sample {s.get('__key__')!r} has no `cls` (class index) field")
            yield _pil_to_uint8(decode_image(image_bytes(s)), image_size), int(s["cls"]) if labels else -1
    elif os.path.isdir(source):
        exts = {f".{e}" for e in IMAGE_FIELDS}
        files = sorted(f for f in os.listdir(source) if os.path.splitext(f)[1].lower() in exts)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(exts))}) in {source}")
        if labels:
            raise ValueError(f"{source}: a flat image folder has no labels; give shards or an npz with `labels`")
        for f in files:
            yield _pil_to_uint8(Image.open(os.path.join(source, f)), image_size), -1
    else:
        raise FileNotFoundError(f"{source}: not an npz, an image folder or WebDataset shards")


def _iter(source: str, batch_size: int, image_size: int | None, labels: bool) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(source, str) and source.endswith(".npz"):
        with np.load(source) as npz:
            arr = npz["arr_0"]  # (N, H, W, 3) uint8
            if labels and "labels" not in npz.files:
                raise KeyError(f"{source}: no `labels` array (keys: {npz.files}); write it with `ardiff sample`")
            lab = npz["labels"].astype(np.int64) if labels else np.full(len(arr), -1, dtype=np.int64)
        if len(lab) != len(arr):
            raise ValueError(f"{source}: {len(lab)} labels for {len(arr)} images")
        for start in range(0, len(arr), batch_size):
            yield nhwc_to_nchw(arr[start : start + batch_size]), torch.from_numpy(lab[start : start + batch_size])
        return
    batch, batch_labels = [], []
    for arr, label in _iter_arrays(source, image_size, labels):
        batch.append(arr)
        batch_labels.append(label)
        if len(batch) == batch_size:
            yield nhwc_to_nchw(_stack(batch, source)), torch.tensor(batch_labels, dtype=torch.long)
            batch, batch_labels = [], []
    if batch:
        yield nhwc_to_nchw(_stack(batch, source)), torch.tensor(batch_labels, dtype=torch.long)


def iter_images(source: str, batch_size: int, image_size: int | None = None) -> Iterator[Tensor]:
    """uint8 (B,3,H,W) batches of the images in an npz, an image folder, or WebDataset shards (in a fixed order).
    `image_size` applies the ADM center crop to folder/shard images (npz images are used as they are)."""
    for images, _ in _iter(source, batch_size, image_size, labels=False):
        yield images


def iter_labeled_images(source: str, batch_size: int, image_size: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 (B,3,H,W), int64 (B,)) batches of WebDataset shards (`cls` field) or an npz with `labels`."""
    yield from _iter(source, batch_size, image_size, labels=True)


def load_labeled_images(
    source: str, image_size: int | None = None, max_images: int | None = None
) -> tuple[Tensor, Tensor]:
    """All (or the first `max_images`) images and labels of `source` in memory: uint8 (N,3,H,W), int64 (N,)."""
    images, labels, seen = [], [], 0
    for x, y in iter_labeled_images(source, 256, image_size):
        if max_images is not None:
            x, y = x[: max_images - seen], y[: max_images - seen]
        images.append(x)
        labels.append(y)
        seen += len(y)
        if max_images is not None and seen >= max_images:
            break
    if not seen:
        raise ValueError(f"{source}: no images")
    return torch.cat(images), torch.cat(labels)

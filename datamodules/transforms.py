"""Image preprocessing shared by the shard readers and the feature caches."""

import io
import math
import random

import numpy as np
import torch
from PIL import Image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop (used by DiT, MAR, LlamaGen): halve with BOX while the short side is >= 2*size,
    resize the short side to `image_size` with BICUBIC, then crop the center square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def random_crop_arr(pil_image: Image.Image, image_size: int, rng: random.Random, min_frac: float = 0.8) -> Image.Image:
    """ADM random crop (D-AR tokenizer training): short side resized to a random length in
    [size, size / min_frac] (BOX halving, then BICUBIC), then a random `image_size` square."""
    short = rng.randrange(math.ceil(image_size), math.ceil(image_size / min_frac) + 1)
    while min(*pil_image.size) >= 2 * short:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = short / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = rng.randrange(arr.shape[0] - image_size + 1), rng.randrange(arr.shape[1] - image_size + 1)
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def random_square_crop(pil_image: Image.Image, image_size: int, rng: random.Random) -> Image.Image:
    """TransDiff `rand_crop_arr` (MRAR training): a random square with the short side, resized (BICUBIC)."""
    w, h = pil_image.size
    side = min(w, h)
    left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    return pil_image.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)


def ten_crop_choice(pil_image: Image.Image, image_size: int, rng: random.Random) -> Image.Image:
    """D-AR GPT training: ADM center crop to 1.1 x size, then one of torchvision's five crops (corners, center);
    with the random flip this draws uniformly from `TenCrop`'s ten crops, as `random.choice(TenCrop(...))`."""
    img = center_crop_arr(pil_image, int(image_size * 1.1))
    w, h = img.size
    cx, cy = int(round((w - image_size) / 2.0)), int(round((h - image_size) / 2.0))
    left, top = rng.choice(
        [(0, 0), (w - image_size, 0), (0, h - image_size), (w - image_size, h - image_size), (cx, cy)]
    )
    return img.crop((left, top, left + image_size, top + image_size))


CROPS = {
    "center": lambda img, size, rng: center_crop_arr(img, size),
    "random": random_crop_arr,
    "square": random_square_crop,
    "ten": ten_crop_choice,
}


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> fully decoded RGB PIL image (raises on corrupt data)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def to_tensor(pil_image: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1], optionally mirrored left-right."""
    arr = np.array(pil_image, dtype=np.uint8)  # (H, W, 3), writable copy
    if flip:
        arr = np.ascontiguousarray(arr[:, ::-1])
    x = torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)
    return x.float().div_(127.5).sub_(1.0)


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a WebDataset sample, whatever its extension."""
    for field in IMAGE_FIELDS:
        if field in sample:
            return sample[field]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image field (one of {IMAGE_FIELDS})")

"""Image preprocessing shared by the shard readers and the feature caches."""

import io

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

"""Frozen pretrained networks used as training losses and reconstruction metrics: VGG16 LPIPS and DINOv2 features.

Weights are never downloaded: each loader takes an explicit path, else an environment variable, else the torch hub
cache, and raises a clear error naming the argument to set. The LPIPS linear layers default to the copy that
torchmetrics ships (`torchmetrics/functional/image/lpips_models/vgg.pth`, byte-identical to the `vgg.pth` in
showlab/D-AR and LlamaGen); the VGG16 backbone needs torchvision's ImageNet file (`vgg16-397923af.pth`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from models.checkpoint import load_state_dict_strict, safe_torch_load


def torchmetrics_lpips_lin(net: str = "vgg") -> str | None:
    """Path of the LPIPS linear-layer weights shipped inside torchmetrics, or None if torchmetrics lacks them."""
    try:
        import torchmetrics.functional.image as tm_image
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(tm_image.__file__), "lpips_models", f"{net}.pth")
    return path if os.path.isfile(path) else None


def resolve_weights(
    path: str | None, env: str, cache_name: str, what: str, how: str, fallback: str | None = None
) -> str:
    """An explicit path, else $env, else `fallback`, else `<torch hub dir>/checkpoints/<cache_name>`; a clear error
    if none exists."""
    candidates = [path, os.environ.get(env), fallback, os.path.join(torch.hub.get_dir(), "checkpoints", cache_name)]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"{what} weights not found (looked at: explicit path {path!r}, ${env}, {candidates[-1]}). {how} "
        "Or set this loss weight to 0 to train without it."
    )


class LPIPS(nn.Module):
    """VGG16 LPIPS (taming/LlamaGen `lpips.py`): unit-normalised relu1_2..relu5_3 features, squared difference,
    learned 1x1 channel weights (`lin{i}.model.1.weight`), spatial mean, summed over the 5 layers. Inputs in [-1, 1]."""

    CHANNELS = (64, 128, 256, 512, 512)
    SLICES = (4, 9, 16, 23, 30)  # ends of the vgg16.features slices

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.net = torchvision.models.vgg16().features[: self.SLICES[-1]]
        for i, c in enumerate(self.CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
            self.add_module(f"lin{i}", lin)

    def features(self, x: Tensor) -> list[Tensor]:
        feats, start = [], 0
        x = (x - self.shift) / self.scale
        for end in self.SLICES:
            x = self.net[start:end](x)
            feats.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            start = end
        return feats

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, 3, H, W) x2 -> (B,) distances."""
        total = 0.0
        for i, (a, b) in enumerate(zip(self.features(x), self.features(y), strict=True)):
            total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean(dim=(1, 2, 3))
        return total


def load_lpips(vgg_path: str | None = None, lin_path: str | None = None) -> LPIPS:
    """LPIPS from torchvision's VGG16 weights (`vgg16-397923af.pth`, keys features.N.*) and the LPIPS linear
    layers (`vgg.pth`: default the copy torchmetrics ships, identical to showlab/D-AR's cache/vgg.pth). Strict keys."""
    vgg_file = resolve_weights(
        vgg_path, "ARDIFF_VGG16_PATH", "vgg16-397923af.pth", "VGG16 (LPIPS)",
        "Download https://download.pytorch.org/models/vgg16-397923af.pth and pass lpips_vgg_path.",
    )  # fmt: skip
    lin_file = resolve_weights(
        lin_path, "ARDIFF_LPIPS_PATH", "vgg.pth", "LPIPS linear layers",
        "Take vgg.pth from showlab/D-AR (tokenizer/tokenizer_image/cache/vgg.pth) and pass lpips_lin_path.",
        fallback=torchmetrics_lpips_lin("vgg"),
    )  # fmt: skip
    model = LPIPS()
    vgg = {
        k.replace("features.", "net.", 1): v for k, v in safe_torch_load(vgg_file).items() if k.startswith("features.")
    }
    sd = {**vgg, **{k: v for k, v in safe_torch_load(lin_file).items() if k.startswith("lin")}}
    load_state_dict_strict(model, sd, source=f"{vgg_file} + {lin_file}")
    return model.eval().requires_grad_(False)


DINOV2_ARCHS = {"dinov2_vitb14": dict(embed_dim=768, depth=12, num_heads=12)}


class DINOv2Features(nn.Module):
    """DINOv2 ViT/14 (timm implementation, facebookresearch/dinov2 key names) returning the normalised patch
    tokens (`x_norm_patchtokens`) of 224 px inputs in [-1, 1], as REPA in the official tokenizer training."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        import timm

        self.vit = timm.models.VisionTransformer(
            img_size=224, patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            init_values=1e-5, num_classes=0,
        )  # fmt: skip
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[None, :, None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = ((x * 0.5 + 0.5) - self.mean) / self.std
        x = F.interpolate(x, 224, mode="bicubic")
        return self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]  # (B, 256, C)


def load_dinov2(path: str | None = None, arch: str = "dinov2_vitb14", **arch_kwargs: int) -> DINOv2Features:
    """DINOv2 from the torch.hub file (`dinov2_vitb14_pretrain.pth`): its 37x37 position table is resized to
    16x16 as DINOv2's own `interpolate_pos_encoding` does (bicubic, scale (16 + 0.1) / 37); `mask_token` unused."""
    file = resolve_weights(
        path, "ARDIFF_DINOV2_PATH", f"{arch}_pretrain.pth", f"DINOv2 {arch} (REPA)",
        f"Download https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}_pretrain.pth "
        "and pass repa_weights_path.",
    )  # fmt: skip
    model = DINOv2Features(**(arch_kwargs or DINOV2_ARCHS[arch]))
    sd = {("vit." + k): v for k, v in safe_torch_load(file).items() if k != "mask_token"}
    pos = sd["vit.pos_embed"]  # (1, 1 + n*n, C)
    n = int((pos.shape[1] - 1) ** 0.5)
    if n != 16:
        grid = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, scale_factor=(16.1 / n, 16.1 / n), mode="bicubic", antialias=False)
        sd["vit.pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1).to(pos)], dim=1)
    load_state_dict_strict(model, sd, source=file)
    return model.eval().requires_grad_(False)

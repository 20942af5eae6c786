"""Layers shared by the models that the official code does not have (opt-in aids for tiny models)."""

from __future__ import annotations

import math

from einops import rearrange
from torch import Tensor, nn


class GridDWConv(nn.Conv2d):
    """Residual depthwise 3x3 conv over a square token grid: (B, N, C) -> h + dwconv(h), N = side^2 (row-major).

    Used inside decoder MLPs (ConvFFN, as in PVTv2/LocalViT): it lets neighbouring tokens agree from the first step,
    where a tiny attention-only decoder stays token-local for thousands of steps. Keys: weight (C, 1, 3, 3), bias.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels)

    def forward(self, h: Tensor) -> Tensor:
        side = math.isqrt(h.shape[1])
        if side * side != h.shape[1]:
            raise ValueError(f"GridDWConv needs a square token grid; got {h.shape[1]} tokens")
        grid = rearrange(h, "b (y x) c -> b c y x", y=side)  # (B, C, side, side)
        return h + rearrange(super().forward(grid), "b c y x -> b (y x) c")

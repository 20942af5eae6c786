"""The TransDiff encoder block is timm's `Block` (and self-attention timm's `Attention`): same state-dict keys as the
official code and the official math, checked against a hand-written pre-LN ViT block (LayerNorm eps 1e-6, qkv with
bias, softmax(q k^T / sqrt(d) + mask) v, exact-GELU MLP) computed from the same weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.transdiff import AttentionBlock, block_causal_mask


def reference_block(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    B, N, D = x.shape
    d = D // heads

    def ln(t, name):
        return F.layer_norm(t, (D,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    qkv = ln(x, "norm1") @ sd["attn.qkv.weight"].T + sd["attn.qkv.bias"]  # (B, N, 3D)
    q, k, v = qkv.view(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)  # each (B, h, N, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~mask, float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    x = x + attn @ sd["attn.proj.weight"].T + sd["attn.proj.bias"]
    h = F.gelu(ln(x, "norm2") @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"])  # exact (erf) GELU
    return x + h @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]


def test_encoder_block_is_the_official_pre_ln_block():
    torch.manual_seed(0)
    block = AttentionBlock(dim=32, num_heads=4, mlp_ratio=4.0, attn_drop=0.1, proj_drop=0.1).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    sd = block.state_dict()
    modules = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    assert sorted(sd) == sorted(f"{m}.{p}" for m in modules for p in ("weight", "bias"))
    x = torch.randn(2, 4 + 3 * 4, 32)
    mask = block_causal_mask(buffer_size=4, block_len=4, num_blocks=3)  # (N, N) bool, True = attend
    with torch.no_grad():
        torch.testing.assert_close(block(x, mask), reference_block(sd, x, 4, mask), rtol=1e-5, atol=1e-5)

"""D-AR sequential diffusion tokenizer (Gao & Shou 2025, showlab/D-AR `tokenizer/tokenizer_image`).

An image becomes N = 256 discrete tokens (ViT encoder with causal learnable queries + l2-normalised VQ). A causal
condition transformer turns the tokens into N condition vectors, and a pixel-space flow-matching decoder
(SiT-like, cross-attention-driven per-token AdaLN) denoises the image in K = 8 steps, step i conditioned on token
group i only (tokens [32i, 32i+32)). Because the condition transformer is causal, decoding can start while the
tokens are still being generated: `stream_decode` continues one diffusion trajectory and yields a preview after
each group (the official one: the AB2 step from the current time straight to t = 1).

Module and parameter names follow the official `VQModel` so `D-AR-tokenizer_v1.pt` loads with strict keys.
Flow convention (official): x_t = t * x1 + (1 - t) * x0, t = 0 noise, t = 1 data, x1 = data_std * image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.checkpoint import CheckpointError, extract_state_dict, load_state_dict_strict, safe_torch_load
from models.layers import GridDWConv
from models.presets import resolve_config


@dataclass
class DARTokenizerConfig:
    image_size: int = 256
    encoder_patch_size: int = 16
    width: int = 768  # encoder_dim == decoder_dim == diffusion dim in every released config
    head_dim: int = 64
    mlp_ratio: int = 4
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    num_tokens: int = 256  # num_all_queries
    num_groups: int = 8  # num_query_groups; queries_per_step = num_tokens // num_groups
    table_size: int = 1024  # rows of query_embedding / decoder_embedding (only the first num_tokens are used)
    query_rank: int = 8  # low-rank learnable queries: Embedding(table_size, rank) -> Linear(rank, width)
    vq_dim: int = 8
    codebook_size: int = 16384
    commit_beta: float = 0.25
    usage_window: int = 65536  # length of the persistent `codebook_used` tracker buffer
    # pixel-space flow-matching decoder
    dec_patch_size: int = 8
    dec_depth: int = 12
    data_std: float = 0.6
    time_shift: float = 2.0
    num_steps: int = 8  # default denoising steps at sampling
    repa_layer: int = 8  # REPA tap: input of this decoder block
    repa_hidden: int = 2048
    repa_dim: int = 768  # feature width of the REPA target encoder (DINOv2 ViT-B/14)
    repa_grid: int = 16  # the tap is average-pooled to repa_grid x repa_grid (DINOv2 at 224 px: 16 x 16)
    rope_theta: float = 10000.0
    grad_checkpointing: bool = True
    # Opt-in training aids for tiny models (the defaults are the official design). With the official decoder the
    # condition reaches the image tokens only through the (zero-initialised) AdaLN modulation, a product of two
    # paths that both start at zero; a tiny tokenizer trained for minutes never starts using it and its encoder
    # collapses to image-independent tokens (flow loss equal with shuffled conditions).
    cond_residual: bool = False  # also add the cross-attention output to each decoder block's residual stream
    time_power: float = 1.0  # training times u = U(0, 1) ** time_power: > 1 trains the early (noisy) steps more
    dec_conv_mlp: bool = False  # depthwise 3x3 conv over the image tokens in each decoder MLP (neighbours agree)
    train_time_shift: float | None = None  # training-only time shift (None: time_shift); sampling keeps time_shift

    @property
    def group_size(self) -> int:
        return self.num_tokens // self.num_groups

    @classmethod
    def from_official(cls, model_cfg: dict) -> DARTokenizerConfig:
        """Map the official yaml `model:` dict (also pickled as `config` in the checkpoints) to this config."""
        dd = model_cfg.get("diff_decoder", {})
        unsupported = {
            "query_low_rank": model_cfg.get("query_low_rank", True) is not True,
            "vq_enable": model_cfg.get("vq_enable", True) is not True,
            "mlp_head": dd.get("mlp_head", False) is not False,
            "share_time_encoding": dd.get("share_time_encoding", False) is not False,
            "encoder_dim != decoder_dim != diff dim": len(
                {model_cfg["encoder_dim"], model_cfg["decoder_dim"], dd.get("dim"), dd.get("cond_dim")}
            )
            != 1,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise CheckpointError(f"unsupported D-AR tokenizer options in the checkpoint config: {bad}")
        cfg = cls(
            encoder_patch_size=model_cfg["encoder_patch_size"],
            width=model_cfg["encoder_dim"],
            num_encoder_layers=model_cfg["num_encoder_layers"],
            num_decoder_layers=model_cfg["num_decoder_layers"],
            num_tokens=model_cfg["num_all_queries"],
            num_groups=model_cfg["num_query_groups"],
            vq_dim=model_cfg["vq_dim"],
            codebook_size=model_cfg["vq_codebook_size"],
            num_steps=model_cfg.get("num_denoising_steps", 8),
            image_size=model_cfg.get("sampling_resolution", 256),
            rope_theta=model_cfg.get("rope_base_len", 10000),
            dec_patch_size=dd["patch_size"],
            dec_depth=dd["depth"],
            data_std=dd.get("data_std", 1.0),
            time_shift=dd.get("time_shift", 1.0),
            repa_layer=dd.get("repa_layer", 8),
        )
        if model_cfg.get("queries_per_step", cfg.group_size) != cfg.group_size:
            raise CheckpointError("queries_per_step must equal num_all_queries // num_query_groups")
        return cfg


DAR_TOKENIZER_CONFIGS: dict[str, DARTokenizerConfig] = {
    # configs/tokenizer_v1.yaml: 307.44M parameters (185.1M decoder without the REPA projector)
    "v1": DARTokenizerConfig(),
    # CPU demo: 32x32 images, 32 tokens in 8 groups of 4, codebook 256; opt-in training aids on (see above)
    "tiny": DARTokenizerConfig(
        image_size=32,
        encoder_patch_size=4,
        width=96,
        head_dim=32,
        num_encoder_layers=2,
        num_decoder_layers=2,
        num_tokens=32,
        num_groups=8,
        table_size=32,
        query_rank=8,
        codebook_size=256,
        usage_window=1024,
        dec_patch_size=4,
        dec_depth=3,
        repa_layer=2,
        repa_hidden=128,
        repa_dim=64,
        repa_grid=4,
        grad_checkpointing=False,
        cond_residual=True,
        time_power=3.0,
        dec_conv_mlp=True,
    ),
}


def make_tokenizer_config(name: str | dict | DARTokenizerConfig, overrides: dict | None = None) -> DARTokenizerConfig:
    """A named config (`DAR_TOKENIZER_CONFIGS`), a dict of fields or a config, with field overrides."""
    return resolve_config(DARTokenizerConfig, DAR_TOKENIZER_CONFIGS, name, overrides)


#################################################################################
#                     Flux-style 2D RoPE (adjacent channel pairs)               #
#################################################################################


def rope_angles_2d(height: int, width: int, head_dim: int, theta: float, device=None) -> Tensor:
    """Rotation angles (height*width, head_dim // 2): the first half of the pairs rotate by row, the rest by column."""
    half = head_dim // 2  # channels per axis
    omega = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64, device=device) / half)  # (half/2,)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    angles = torch.cat([rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega], dim=-1)
    return angles.float()  # (H*W, head_dim/2)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, L, hd) by angles (L, hd/2), in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, L, hd/2, 2)
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


#################################################################################
#                              Transformer parts                                #
#################################################################################


def layer_norm(x: Tensor) -> Tensor:
    """The official parameter-free LayerNorm (eps 1e-6)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Mlp(nn.Module):
    """fc2(SiLU(fc1(x))); with grid_conv (opt-in, image tokens only) a residual depthwise 3x3 conv over the token
    grid after fc1 (`models.layers.GridDWConv`, key dwconv.*)."""

    def __init__(self, dim: int, hidden: int, grid_conv: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dwconv = GridDWConv(hidden) if grid_conv else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.dwconv is not None:
            h = self.dwconv(h)
        return self.fc2(F.silu(h))


class Attention(nn.Module):
    """Multi-head attention with separate biased q/k/v/proj, QK-LayerNorm before RoPE; self- or cross-attention."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        q_rope: Tensor | None = None,
        k_rope: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        context = x if context is None else context
        split = lambda t: rearrange(t, "b l (h d) -> b h l d", h=self.num_heads)
        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))  # (B, H, L, hd)
        q, k = self.q_norm(q).type_as(q), self.k_norm(k).type_as(k)
        if q_rope is not None:
            q = apply_rope(q, q_rope)
        if k_rope is not None:
            k = apply_rope(k, k_rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class TransformerBlock(nn.Module):
    """Pre-norm block with zero-initialised per-channel residual gates (encoder and condition transformer)."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.gate1 = nn.Parameter(torch.zeros(dim))
        self.gate2 = nn.Parameter(torch.zeros(dim))

    def forward(
        self, x: Tensor, rope: Tensor | None = None, mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        x = x + self.gate1 * self.attention(self.norm1(x), q_rope=rope, k_rope=rope, mask=mask, causal=causal)
        return x + self.gate2 * self.mlp(self.norm2(x))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of 1000 t ([cos, sin], max period 1e4), then Linear-SiLU-Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype)  # bf16 under FSDP2 policy
        return self.mlp(emb)  # (B, D)


class SiTBlock(nn.Module):
    """Decoder block: the cross-attention of LN(x) to the step's condition tokens is not added to x; it drives a
    per-token AdaLN (shift/scale/gate for attention and MLP) together with the timestep embedding."""

    def __init__(
        self, dim: int, head_dim: int, mlp_ratio: int, cond_residual: bool = False, conv_mlp: bool = False
    ) -> None:
        super().__init__()
        self.cond_residual = cond_residual
        self.attention = Attention(dim, head_dim)
        self.cross_attn = Attention(dim, head_dim)
        self.mlp = Mlp(dim, dim * mlp_ratio, grid_conv=conv_mlp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor, cond: Tensor, t: Tensor, rope: Tensor) -> Tensor:
        # x (B, L, D) image tokens, cond (B, G, D) condition tokens of this step, t (B,)
        c = layer_norm(self.cond_embed(cond))
        sc = self.cross_attn(layer_norm(x), context=c, q_rope=rope)  # (B, L, D)
        if self.cond_residual:  # opt-in (not official): a direct, additive path for the condition
            x = x + sc
        mod = self.adaLN_modulation(self.time_embed(t)[:, None] + sc)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        x = x + gate_a * self.attention(layer_norm(x) * (1 + scale_a) + shift_a, q_rope=rope, k_rope=rope)
        return x + gate_m * self.mlp(layer_norm(x) * (1 + scale_m) + shift_m)


class DiffusionCore(nn.Module):
    """Velocity network v(x_t, t, cond) on pixel patches (official `DiffusionCore`, mlp_head=False)."""

    def __init__(self, cfg: DARTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p = cfg.width, cfg.dec_patch_size
        self.cond_mlp = nn.Linear(d, d)
        self.conv_in = nn.Conv2d(3 * p * p, d, 1)
        self.conv_out = nn.Conv2d(d, 3 * p * p, 1)
        self.blocks = nn.ModuleList(
            [
                SiTBlock(d, cfg.head_dim, cfg.mlp_ratio, cfg.cond_residual, cfg.dec_conv_mlp)
                for _ in range(cfg.dec_depth)
            ]
        )
        self.repa_out = nn.Sequential(
            nn.Linear(d, cfg.repa_hidden),
            nn.SiLU(),
            nn.Linear(cfg.repa_hidden, cfg.repa_hidden),
            nn.SiLU(),
            nn.Linear(cfg.repa_hidden, cfg.repa_dim),
        )

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> tuple[Tensor, Tensor | None]:
        # x (B, 3, H, W) noisy scaled image, t (B,), cond (B, G, D) -> velocity (B, 3, H, W), REPA features
        cfg, p = self.cfg, self.cfg.dec_patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        cond = layer_norm(self.cond_mlp(cond))
        rope = rope_angles_2d(h, w, cfg.head_dim, cfg.rope_theta, x.device)  # (h*w, hd/2)
        patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        patches = patches.to(self.conv_in.weight.dtype)  # fp32 noisy input -> bf16 under FSDP2's mixed precision
        tokens = F.linear(patches, self.conv_in.weight.flatten(1), self.conv_in.bias)  # (B, h*w, D)
        h_repa = None
        for i, block in enumerate(self.blocks):
            if i == cfg.repa_layer and self.training:
                grid = rearrange(tokens, "b (h w) d -> b d h w", h=h)
                pooled = F.avg_pool2d(grid, h // cfg.repa_grid)
                h_repa = self.repa_out(rearrange(pooled, "b d h w -> b (h w) d"))  # (B, repa_grid^2, repa_dim)
            if cfg.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, cond, t, rope, use_reentrant=False)
            else:
                tokens = block(tokens, cond, t, rope)
        out = F.linear(layer_norm(tokens), self.conv_out.weight.flatten(1), self.conv_out.bias)  # (B, h*w, 3p^2)
        return rearrange(out, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=h, p1=p, p2=p), h_repa


class FlowDecoder(nn.Module):
    """Holds the velocity net (`diff_decoder.net` in the official key names) and the flow-matching conventions."""

    def __init__(self, cfg: DARTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = DiffusionCore(cfg)

    def shift(self, u: Tensor, beta: float | None = None) -> Tensor:
        """Time shift t = u / (u + beta (1 - u)) (beta: cfg.time_shift): more steps near the noise end."""
        beta = self.cfg.time_shift if beta is None else beta
        return u / (u + beta * (1 - u))

    def forward(self, image: Tensor, cond: Tensor, u: Tensor) -> dict[str, Tensor]:
        """Flow-matching loss at raw times u (B,) with condition tokens cond (B, G, D)."""
        std = self.cfg.data_std
        t = self.shift(u, self.cfg.train_time_shift)
        te = t[:, None, None, None]
        x1 = image * std
        x0 = torch.randn_like(x1)
        xt = te * x1 + (1 - te) * x0
        v, h_repa = self.net(xt, t, cond)
        fm_loss = F.mse_loss(v.float(), (x1 - x0).float()) / std**2
        x1_hat = (xt + (1 - te) * v) / std  # one-step estimate of the clean image, for LPIPS
        return {"fm_loss": fm_loss, "x1_hat": x1_hat, "h_repa": h_repa, "t": t}


#################################################################################
#                                  Quantizer                                    #
#################################################################################


class VectorQuantizer(nn.Module):
    """Cosine-similarity VQ: z and the codebook are l2-normalised; straight-through estimator.

    The similarities take the ambient precision, as in the official code: bf16 under bf16 autocast (tokenizer
    training with `bf16-mixed`, like the official accelerate bf16 run), fp32 otherwise (token caching, evaluation).
    """

    def __init__(self, cfg: DARTokenizerConfig) -> None:
        super().__init__()
        self.beta = cfg.commit_beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.vq_dim)
        self.register_buffer("codebook_used", torch.zeros(cfg.usage_window))  # recent ids (usage tracker only)

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=-1)  # (K, C)

    def lookup(self, ids: Tensor) -> Tensor:
        return self.codebook()[ids]  # (..., C)

    def forward(self, z: Tensor, loss_upto: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z (B, N, C) -> (z_q straight-through (B, N, C), ids (B, N), losses).

        loss_upto (B,): last token index whose VQ loss counts (tokens after the sampled group cannot affect the
        diffusion condition, so the official loss masks them).
        """
        z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        ids = torch.argmax(z.detach() @ codebook.t(), dim=-1)  # nearest neighbour under cosine distance
        z_q = codebook[ids]
        losses: dict[str, Tensor] = {}
        if loss_upto is not None:
            mask = (torch.arange(z.shape[1], device=z.device)[None] <= loss_upto[:, None]).float()  # (B, N)
            vq = ((z_q - z.detach()) ** 2).mean(-1)
            commit = ((z_q.detach() - z) ** 2).mean(-1)
            losses["vq_loss"] = (vq * mask).sum() / mask.sum()
            losses["commit_loss"] = self.beta * (commit * mask).sum() / mask.sum()
            losses["codebook_usage"] = self._track_usage(ids)
        return z + (z_q - z).detach(), ids, losses

    @torch.no_grad()
    def _track_usage(self, ids: Tensor, chunk: int = 512) -> Tensor:
        """Slide `chunk` random ids of this batch into the window; return the fraction of codes seen in it."""
        flat = ids.flatten()
        picked = flat[torch.randperm(flat.numel(), device=flat.device)[:chunk]].float()
        n = picked.numel()
        self.codebook_used[:-n] = self.codebook_used[n:].clone()
        self.codebook_used[-n:] = picked
        return torch.tensor(self.codebook_used.unique().numel() / self.embedding.num_embeddings)


#################################################################################
#                                 Tokenizer                                     #
#################################################################################


class DARTokenizer(nn.Module):
    def __init__(self, cfg: DARTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patchify = nn.Conv2d(3, d, cfg.encoder_patch_size, stride=cfg.encoder_patch_size)
        self.query_embedding = nn.Embedding(cfg.table_size, cfg.query_rank)
        self.query_linear = nn.Linear(cfg.query_rank, d)
        self.encoder_layers = nn.ModuleList(
            [TransformerBlock(d, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.num_encoder_layers)]
        )
        self.quant_in_conv = nn.Conv2d(d, cfg.vq_dim, 1, bias=False)
        self.quantize = VectorQuantizer(cfg)
        self.quant_out_conv = nn.Conv2d(cfg.vq_dim, d, 1, bias=False)
        self.decoder_embedding = nn.Embedding(cfg.table_size, d)
        self.decoder_layers = nn.ModuleList(
            [TransformerBlock(d, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.num_decoder_layers)]
        )
        self.diff_decoder = FlowDecoder(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.query_embedding.weight, std=1.0)
        nn.init.trunc_normal_(self.decoder_embedding.weight, std=0.02)
        k = self.quantize.embedding.weight
        k.data.uniform_(-1.0 / k.shape[0], 1.0 / k.shape[0]).copy_(F.normalize(k.data, dim=-1))
        for block in self.diff_decoder.net.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.diff_decoder.net.conv_out.weight)
        nn.init.zeros_(self.diff_decoder.net.conv_out.bias)

    # ------------------------------------------------------------------ encoder / condition transformer
    def _run(self, block: TransformerBlock, x: Tensor, **kw) -> Tensor:
        if self.cfg.grad_checkpointing and self.training:
            return checkpoint(block, x, use_reentrant=False, **kw)
        return block(x, **kw)

    def encode_continuous(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> pre-quantisation features (B, N, vq_dim)."""
        cfg = self.cfg
        patches = self.patchify(x)  # (B, D, h, w)
        h, w = patches.shape[-2:]
        patches = layer_norm(rearrange(patches, "b d h w -> b (h w) d"))
        queries = self.query_linear(self.query_embedding.weight[: cfg.num_tokens]).expand(x.shape[0], -1, -1)
        tokens = torch.cat([patches, queries], dim=1)  # (B, P + N, D)
        n_patch, total = h * w, h * w + cfg.num_tokens
        rope = rope_angles_2d(h, w, cfg.head_dim, cfg.rope_theta, x.device)
        rope = torch.cat([rope, rope.new_zeros(cfg.num_tokens, rope.shape[1])])  # queries: identity rotation
        # patches see all patches; query k sees all patches and queries 0..k
        mask = torch.ones(total, total, dtype=torch.bool, device=x.device).tril()
        mask[:, :n_patch] = True
        for layer in self.encoder_layers:
            tokens = self._run(layer, tokens, rope=rope, mask=mask)
        z = layer_norm(tokens[:, n_patch:])
        return F.linear(z, self.quant_in_conv.weight.flatten(1))  # (B, N, vq_dim)

    def condition(self, z_q: Tensor) -> Tensor:
        """Quantised vectors (B, n, vq_dim) of a token prefix -> causal condition features (B, n, D)."""
        n = z_q.shape[1]
        h = F.linear(z_q, self.quant_out_conv.weight.flatten(1)) + self.decoder_embedding.weight[:n]
        for layer in self.decoder_layers:
            h = self._run(layer, h, causal=True)
        return layer_norm(h)

    @torch.no_grad()
    def encode_tokens(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> token ids (B, N) int64."""
        _, ids, _ = self.quantize(self.encode_continuous(x))
        return ids

    # ------------------------------------------------------------------ training
    def group_of(self, u: Tensor) -> Tensor:
        """Raw time u in [0, 1) -> condition group (official rounding rule: round(u K), clamped to K - 1)."""
        return (u * self.cfg.num_groups + 0.5).floor().long().clamp(max=self.cfg.num_groups - 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Training step: one random time per image, its token group conditions the flow-matching loss.

        Returns fm_loss, vq_loss, commit_loss, codebook_usage, x1_hat (one-step estimate in [-1, 1] scale),
        h_repa (REPA projector output or None), t (shifted times), ids.
        """
        cfg, gs = self.cfg, self.cfg.group_size
        u = torch.rand(x.shape[0], device=x.device)
        if cfg.time_power != 1.0:
            u = u**cfg.time_power
        group = self.group_of(u)  # (B,)
        z_q, ids, vq_losses = self.quantize(self.encode_continuous(x), loss_upto=(group + 1) * gs - 1)
        cond = self.condition(z_q)  # (B, N, D)
        index = (group * gs)[:, None] + torch.arange(gs, device=x.device)  # (B, gs)
        cond = torch.gather(cond, 1, index[..., None].expand(-1, -1, cfg.width))  # (B, gs, D)
        return {**vq_losses, **self.diff_decoder(x, cond, u), "ids": ids}

    # ------------------------------------------------------------------ sampling
    def schedule(self, steps: int | None = None) -> tuple[list[float], list[int]]:
        """Shifted times t_0..t_steps (t_steps = 1) and the token group used at each step."""
        steps = steps or self.cfg.num_steps
        u = torch.tensor([i / steps for i in range(steps)] + [1.0], dtype=torch.float64)
        groups = self.group_of(u[:-1]).tolist()
        return self.diff_decoder.shift(u).tolist(), groups

    @torch.no_grad()
    def stream_decode(
        self,
        tokens: Tensor | Iterable[Tensor],
        generator: torch.Generator | None = None,
        steps: int | None = None,
        size: int | None = None,
        preview: str = "ab2",
    ) -> Iterator[Tensor]:
        """Decode while tokens arrive: one diffusion trajectory, one yield per denoising step.

        tokens: (B, n) ids, or an iterable of (B, n_i) chunks (e.g. straight from the AR sampler).
        Step i runs as soon as its token group is available; the yield after a non-final step is a preview, the
        final yield is the decoded image (equal to `decode_tokens` of the full sequence with the same generator).
        Stops early when the tokens run out (prefix previews). Adams-Bashforth-2 with the official uniform-step
        coefficients (first step Euler). Images in [-1, 1].

        preview: "ab2" (default, the official `--preview`, `decode_code(ids, clip_steps=k)`): after step k the
        same AB2 update is taken from t_{k-1} straight to t = 1; "euler": the one-step estimate
        x_hat1 = (x_t + (1 - t) v) / data_std (identical for the first group, slightly blurrier after).
        """
        if preview not in ("ab2", "euler"):
            raise ValueError(f"preview must be 'ab2' (official) or 'euler', got {preview!r}")
        cfg, gs = self.cfg, self.cfg.group_size
        chunks = iter([tokens] if isinstance(tokens, Tensor) else tokens)
        ids = next(chunks)
        size = size or cfg.image_size
        times, groups = self.schedule(steps)
        ref = self.quantize.embedding.weight
        noise_device = generator.device if generator is not None else ref.device  # CPU generator: device-independent
        x = torch.randn(ids.shape[0], 3, size, size, generator=generator, device=noise_device).to(ref)
        cond, v_prev = None, None
        for i, group in enumerate(groups):
            while ids.shape[1] < (group + 1) * gs:  # wait for this step's tokens
                nxt = next(chunks, None)
                if nxt is None:
                    return
                ids = torch.cat([ids, nxt], dim=1)
            if cond is None or cond.shape[1] < ids.shape[1]:
                cond = self.condition(self.quantize.lookup(ids))  # causal: a prefix gives the same features
            t, dt = times[i], times[i + 1] - times[i]
            v, _ = self.diff_decoder.net(
                x, torch.full((x.shape[0],), t, device=x.device), cond[:, group * gs : (group + 1) * gs]
            )
            last = i == len(groups) - 1
            slope = v if v_prev is None else 1.5 * v - 0.5 * v_prev  # AB2 (first step: Euler)
            if not last:
                yield (x + (1 - t) * (slope if preview == "ab2" else v)) / cfg.data_std
            x = x + dt * slope
            v_prev = v
            if last:
                yield x / cfg.data_std

    @torch.no_grad()
    def decode_tokens(
        self, tokens: Tensor, generator: torch.Generator | None = None, steps: int | None = None
    ) -> Tensor:
        """Token ids (B, N) -> images (B, 3, H, W) in [-1, 1] (8-step AB2 by default)."""
        *_, image = self.stream_decode(tokens, generator, steps)
        return image

    @torch.no_grad()
    def decode_prefix(
        self,
        tokens: Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        preview: str = "ab2",
    ) -> Tensor:
        """Preview from the first n >= group_size tokens (B, n): the preview (see `stream_decode`) after the last
        step they allow; "ab2" equals the official `decode_code(ids, clip_steps=k)`."""
        if tokens.shape[1] < self.cfg.group_size:
            raise ValueError(f"a preview needs at least one token group ({self.cfg.group_size} tokens)")
        *_, image = self.stream_decode(tokens, generator, steps, preview=preview)
        return image

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None, steps: int | None = None) -> Tensor:
        return self.decode_tokens(self.encode_tokens(x), generator, steps)


def load_dar_tokenizer(path: str, config: DARTokenizerConfig | str | None = None, use_ema: bool = True) -> DARTokenizer:
    """Load an official D-AR tokenizer file (`ema` > `model` > raw state dict; its pickled `config_util.Config`
    is read without executing code). Strict keys. (Lightning checkpoints of a `DARTokenizerModule` run:
    `lightning_modules.dar.load_tokenizer_checkpoint`, which reads both.)

    config: overrides the configuration (name in DAR_TOKENIZER_CONFIGS or a config); default: the one stored in
    the file, else `v1`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"D-AR tokenizer checkpoint not found: {path!r}. Download D-AR-tokenizer_v1.pt from the Hugging Face "
            "repo showlab/D-AR, or pass the .ckpt of a DARTokenizerModule run."
        )
    return dar_tokenizer_from_official(safe_torch_load(path), config, use_ema, source=path)


def dar_tokenizer_from_official(
    ckpt: Any, config: DARTokenizerConfig | str | None = None, use_ema: bool = True, source: str = "checkpoint"
) -> DARTokenizer:
    """`load_dar_tokenizer` on an already loaded official checkpoint dict."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: expected a checkpoint dict, got {type(ckpt).__name__}")
    if "pytorch-lightning_version" in ckpt:
        raise CheckpointError(
            f"{source} is a Lightning checkpoint, not an official D-AR tokenizer file; load it with "
            "lightning_modules.dar.load_tokenizer_checkpoint (the `ardiff` commands do)"
        )
    sd = extract_state_dict(ckpt, ("ema", "model", "state_dict") if use_ema else ("model", "state_dict"))
    stored = ckpt.get("config")
    if stored is not None:
        stored = stored.to_dict() if hasattr(stored, "to_dict") else stored
        stored = stored.get("_data", stored)  # official Config keeps its dict in `_data`
        stored = DARTokenizerConfig.from_official(stored["model"])
    return build_dar_tokenizer(sd, config or stored, source=source)


def build_dar_tokenizer(
    state_dict: dict[str, Tensor], config: DARTokenizerConfig | str | None = None, source: str = "state dict"
) -> DARTokenizer:
    """A tokenizer (eval mode) with `state_dict` loaded strictly; config: preset name or config (default v1)."""
    cfg = make_tokenizer_config(config) if config is not None else DAR_TOKENIZER_CONFIGS["v1"]
    with torch.device("meta"):
        model = DARTokenizer(cfg)
    load_state_dict_strict(model, state_dict, source=source, assign=True)
    return model.eval()

"""TransDiff (Zhen et al. 2025): an AR transformer encoder + a cross-attention diffusion decoder, with MRAR.

The encoder ("AR transformer") turns a class label -- and, with MRAR, previously generated reference images -- into
semantic feature tokens c. The decoder (a PixArt-style DiT with adaLN-single and cross-attention to c) denoises the
whole latent image with a rectified-flow velocity loss; both are trained jointly by that loss alone.

Sequence layout of the encoder (official sizes: buffer 64, seq_len 256):
    1-step: [class x buffer][mask_token x seq_len]                     full attention
    MRAR:   [class x buffer][mask_tokens][ref_0]...[ref_{n-2}]        block-causal over blocks of seq_len/n tokens
Block k of the MRAR output (with everything before it) conditions image k; image k+1's reference block is image k.

Parameter/buffer names follow the official code (TransDiff/TransDiff) so released checkpoints load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention as TimmAttention
from timm.layers import Mlp, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.checkpoint import LoadReport, extract_state_dict, load_state_dict_strict, safe_torch_load
from models.layers import GridDWConv


@dataclass
class TransDiffConfig:
    # latent image: the VAE latent has `vae_embed_dim` channels and `img_size // vae_stride` pixels a side
    img_size: int = 256
    vae_stride: int = 16
    vae_embed_dim: int = 16
    num_classes: int = 1000
    # AR transformer encoder (official factories pass encoder_depth = half of `encoder_depth` here: 2*depth blocks)
    encoder_embed_dim: int = 1024
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    # diffusion decoder
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    decoder_patch_size: int = 1  # latent patch per decoder token (official: 1, i.e. one token per latent pixel)
    # Opt-in (official: False): a depthwise 3x3 conv over the decoder's token grid inside each decoder MLP (ConvFFN).
    # Without it a tiny pixel-space decoder stays token-local for thousands of steps (each token denoised from
    # itself: samples are independent 4x4 blocks); the conv lets neighbouring tokens agree from the first step.
    decoder_conv_mlp: bool = False
    # Opt-in (official: False): start the decoder's learned position embedding at DiT's fixed 2D sin-cos table instead
    # of N(0, 0.02), where token positions are ~50x weaker than the projected noisy input. Same parameter and keys.
    # Measured gain: experiments/transdiff/demo.yaml.
    decoder_sincos_pos: bool = False
    # What the decoder network outputs (official: "v", the velocity eps - x0). "x" (opt-in): the clean token x0, turned
    # into the velocity v = (x_t - x0) / max(t, x_pred_t_min) for the same velocity loss and sampler (JiT, Li & He
    # 2025: a small network fits the low-dimensional data better than the full-dimensional noise).
    decoder_prediction: Literal["v", "x"] = "v"
    x_pred_t_min: float = 0.05
    # Training time t = sigmoid(N(time_mean, time_std)) (official: logit-normal(0, 1)). time_mean > 0 (opt-in) trains
    # more at high noise, where a sample's layout is decided (SD3's and JiT's shift). Measured in the demo recipe.
    time_mean: float = 0.0
    time_std: float = 1.0
    mlp_ratio: float = 4.0
    seq_len: int = 256  # encoder tokens after the buffer (official: fixed 256, also at 512 px)
    buffer_size: int = 64  # class-embedding slots prepended to the encoder sequence
    patch_size: int = 1  # latent patch per encoder reference token (z_proj input = vae_embed_dim * patch_size**2)
    mrar: bool = False
    mrar_images: int = 4  # MRAR: images per sequence; the first n-1 serve as references (official: 4)
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffusion_batch_mul: int = 4  # noise draws per image per step
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.mrar:
            block = self.seq_len // self.mrar_images
            grid = self.latent_size // self.patch_size
            if self.seq_len % self.mrar_images or grid * grid != block:
                raise ValueError(
                    f"MRAR needs seq_len/mrar_images = (latent_size/patch_size)^2 reference tokens per image; got "
                    f"seq_len={self.seq_len}, mrar_images={self.mrar_images}, latent_size={self.latent_size}, "
                    f"patch_size={self.patch_size}"
                )

    @property
    def latent_size(self) -> int:
        return self.img_size // self.vae_stride

    @property
    def block_len(self) -> int:
        """Encoder tokens per MRAR image block (the mask block and each reference)."""
        return self.seq_len // self.mrar_images if self.mrar else self.seq_len

    @property
    def num_decoder_tokens(self) -> int:
        return (self.latent_size // self.decoder_patch_size) ** 2


_BASE = TransDiffConfig(encoder_embed_dim=768, encoder_depth=24, encoder_num_heads=12, decoder_embed_dim=768,
                        decoder_depth=12, decoder_num_heads=12)  # fmt: skip
_LARGE = TransDiffConfig()
_HUGE = TransDiffConfig(encoder_embed_dim=1280, encoder_depth=40, encoder_num_heads=16, decoder_embed_dim=1280,
                        decoder_depth=20, decoder_num_heads=16)  # fmt: skip
_MRAR = dict(mrar=True, patch_size=2, diffusion_batch_mul=2)

TRANSDIFF_CONFIGS: dict[str, TransDiffConfig] = {
    "transdiff_base": _BASE,
    "transdiff_large": _LARGE,
    "transdiff_huge": _HUGE,
    "transdiff_base_mrar": replace(_BASE, **_MRAR),
    "transdiff_large_mrar": replace(_LARGE, **_MRAR),
    "transdiff_huge_mrar": replace(_HUGE, **_MRAR),
    "transdiff_large_512": replace(_LARGE, img_size=512),
    # pixel-space CPU demo on 32x32 images (IdentityAutoencoder): 64 decoder tokens of 4x4x3 pixels (token dims must
    # stay well below the width: a velocity/noise target of 8x8x3 = 192 dims at width 128 is not learnable)
    "tiny": TransDiffConfig(
        img_size=32,
        vae_stride=1,
        vae_embed_dim=3,
        num_classes=10,
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        decoder_embed_dim=128,
        decoder_depth=4,
        decoder_num_heads=4,
        decoder_patch_size=4,
        decoder_conv_mlp=True,
        decoder_sincos_pos=True,
        decoder_prediction="x",
        time_mean=0.4,
        seq_len=16,
        buffer_size=4,
        patch_size=1,
        attn_dropout=0.0,
        proj_dropout=0.0,
        diffusion_batch_mul=1,
    ),
}
TRANSDIFF_CONFIGS["tiny_mrar"] = replace(TRANSDIFF_CONFIGS["tiny"], mrar=True, patch_size=16)


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------
def Attention(dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> nn.Module:
    """Self-attention: timm's `Attention` with qkv bias (official keys qkv.*, proj.*; SDPA with attn_mask)."""
    return TimmAttention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(context_dim, dim)
        self.wv = nn.Linear(context_dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = rearrange(self.wq(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, H, N, d)
        k = rearrange(self.wk(context), "b m (h d) -> b h m d", h=self.num_heads)  # (B, H, M, d)
        v = rearrange(self.wv(context), "b m (h d) -> b h m d", h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))


class AttentionBlock(Block):
    """Pre-LN ViT block of the encoder: timm's `Block` (the official keys norm1/attn.qkv/attn.proj/norm2/mlp.fc1/fc2,
    LayerNorm eps 1e-6, qkv bias, exact-GELU MLP; forward(x, attn_mask))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)


class ConvMlp(Mlp):
    """timm's `Mlp` (keys fc1/fc2) with a residual depthwise 3x3 conv over the token grid after fc1 (ConvFFN):
    fc2(GELU(h + dwconv(h))), h = fc1(x). Key added: dwconv.{weight,bias}."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__(dim, hidden, act_layer=nn.GELU, drop=drop)
        self.dwconv = GridDWConv(hidden)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(self.fc1(x))  # (B, N, H)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(h)))))


class CrossAttentionBlock(nn.Module):
    """Decoder block: adaLN-single modulated self-attention, plain cross-attention to c, modulated MLP."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_heads: int,
        mlp_ratio: float,
        attn_drop: float,
        proj_drop: float,
        conv_mlp: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn1 = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn2 = CrossAttention(dim, context_dim, num_heads, attn_drop, proj_drop)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = ConvMlp(dim, hidden, proj_drop) if conv_mlp else Mlp(dim, hidden, act_layer=nn.GELU, drop=proj_drop)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, c: Tensor, t6: Tensor) -> Tensor:
        # x (B, N, D), c (B, M, D), t6 (B, 6, D): the shared timestep modulation
        mod = self.scale_shift_table + t6.to(x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # each (B, 1, D)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(self.norm2(x), c)
        return x + gate_mlp * self.mlp(self.norm3(x) * (1 + scale_mlp) + shift_mlp)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of t (B,) in [0, 1000] -> (B, dim), as diffusers `Timesteps(flip_sin_to_cos)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t -> temb (B, D) for the final layer and the adaLN-single vector (B, 6D) shared by all blocks."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = nn.Module()  # official key path: time_embed.time_embedder.linear_{1,2}
        self.time_embedder.linear_1 = nn.Linear(freq_dim, dim)
        self.time_embedder.linear_2 = nn.Linear(dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        freq = timestep_embedding(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)  # bf16 under FSDP2
        temb = self.time_embedder.linear_2(F.silu(self.time_embedder.linear_1(freq)))
        return temb, self.time_proj(F.silu(temb))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiffusionDecoder(nn.Module):
    """Velocity network v(x_t, c, t): x_t (B, N, C_tok), c (B, M, D_enc), t (B,) in [0, 1000] -> (B, N, C_tok)."""

    def __init__(self, cfg: TransDiffConfig):
        super().__init__()
        dim, token_dim = cfg.decoder_embed_dim, cfg.vae_embed_dim * cfg.decoder_patch_size**2
        self.grad_checkpointing = cfg.grad_checkpointing
        self.input_proj = nn.Linear(token_dim, dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.num_decoder_tokens, dim))
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Linear(cfg.encoder_embed_dim, dim)
        self.res_blocks = nn.ModuleList(
            CrossAttentionBlock(
                dim, dim, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout, cfg.decoder_conv_mlp
            )
            for _ in range(cfg.decoder_depth)
        )
        self.final_layer = FinalLayer(dim, token_dim)

    def forward(self, x: Tensor, c: Tensor, t: Tensor) -> Tensor:
        # fp32 noisy input -> the parameters' dtype (bf16 under FSDP2's MixedPrecisionPolicy; no-op in fp32)
        x = self.input_proj(x.to(self.input_proj.weight.dtype)) + self.diffusion_pos_embed_learned  # (B, N, D)
        temb, t6 = self.time_embed(t)  # (B, D), (B, 6D)
        t6 = t6.unflatten(1, (6, -1))  # (B, 6, D)
        c = self.cond_embed(c)  # (B, M, D)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, c, t6, use_reentrant=False)
            else:
                x = block(x, c, t6)
        return self.final_layer(x, temb)


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the same noise anywhere)."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_on).to(device)


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) noise, drawn like `_randn`."""
    draw_on = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=draw_on).to(device)


class DiffDecoder(nn.Module):
    """Rectified-flow loss and Euler-Maruyama sampler around the velocity network (official key prefix `.net`).

    Path x_t = (1 - t) x_0 + t eps, t = 1 is noise; the network predicts v = eps - x_0 (or x_0 itself with
    decoder_prediction "x", see `velocity`) and takes 1000 t as input.
    """

    def __init__(self, cfg: TransDiffConfig):
        super().__init__()
        if cfg.decoder_prediction not in ("v", "x"):
            raise ValueError(f"decoder_prediction must be 'v' or 'x', got {cfg.decoder_prediction!r}")
        self.predict_x, self.t_min = cfg.decoder_prediction == "x", cfg.x_pred_t_min
        self.time_mean, self.time_std = cfg.time_mean, cfg.time_std
        self.net = DiffusionDecoder(cfg)

    def velocity(self, x_t: Tensor, c: Tensor, timesteps: Tensor) -> Tensor:
        """v(x_t, c, t) in fp32: the network's output, or with x-prediction (x_t - x0_hat) / max(t, t_min)."""
        out = self.net(x_t, c, timesteps).float()  # (B, N, C_tok)
        if not self.predict_x:
            return out
        t = (timesteps.float() / 1000).clamp(min=self.t_min)[:, None, None]  # (B, 1, 1)
        return (x_t.float() - out) / t

    def loss(
        self,
        x0: Tensor,
        c: Tensor,
        noise: Tensor | None = None,
        timesteps: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """MSE velocity loss. x0 (B, N, C_tok), c (B, M, D); timesteps: integers in [0, 999], logit-normal if None."""
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device)
        if timesteps is None:  # logit-normal time, truncated to an integer step k = floor(1000 t)
            z = _randn((x0.shape[0],), generator, x0.device) * self.time_std + self.time_mean  # (B,)
            timesteps = (torch.sigmoid(z) * 1000).long()
        t = (timesteps.float() / 1000)[:, None, None]  # (B, 1, 1)
        x_t = (1 - t) * x0 + t * noise
        return F.mse_loss(self.velocity(x_t, c, timesteps), noise - x0)

    @torch.no_grad()
    def sample(
        self,
        c: Tensor,
        noise: Tensor,
        num_steps: int = 100,
        cfg: float = 1.0,
        scale_0: float = 1.0,
        scale_1: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Euler-Maruyama on the reverse SDE with g(t)^2 = 2t (REPA's sampler as used by TransDiff).

        c: (B, M, D), or (2B, M, D) = [cond; uncond] when cfg != 1; noise (B, N, C_tok). Grid linspace(1, 0.04, N)
        then 0: N - 1 stochastic steps and a final deterministic one, N network calls. CFG acts on the drift at every
        step; scale_0 / scale_1 shrink the drift / injected noise of the stochastic steps (official knobs).
        """
        guided = cfg != 1.0
        ts = torch.cat([torch.linspace(1.0, 0.04, num_steps), torch.zeros(1)]).tolist()
        x = noise.float()  # (B, N, C_tok)
        for i in range(num_steps):
            t, dt = ts[i], ts[i + 1] - ts[i]
            x_in = torch.cat([x, x]) if guided else x
            v = self.velocity(x_in, c, torch.full((x_in.shape[0],), 1000 * t, device=x.device))
            if guided:
                v_c, v_u = v.chunk(2)
                v = v_u + cfg * (v_c - v_u)
            drift = x + (2 - t) * v  # v - (g^2/2) * score, with score = -(x + (1 - t) v) / t on the linear path
            if i < num_steps - 1:
                eps = _randn(x.shape, generator, x.device)
                x = x + scale_0 * drift * dt + scale_1 * math.sqrt(2 * t) * math.sqrt(-dt) * eps
            else:
                x = x + drift * dt
        return x


# --------------------------------------------------------------------------------------------------------------------
# TransDiff
# --------------------------------------------------------------------------------------------------------------------
def block_causal_mask(buffer_size: int, block_len: int, num_blocks: int) -> Tensor:
    """Boolean (L, L) mask, True = may attend: blocks [buffer][block_0]...[block_{n-1}] see themselves and the past."""
    block_id = torch.cat([torch.zeros(buffer_size), torch.arange(1, num_blocks + 1).repeat_interleave(block_len)])
    return block_id[None, :] <= block_id[:, None]


class TransDiff(nn.Module):
    def __init__(self, cfg: TransDiffConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.encoder_embed_dim
        self.class_emb = nn.Embedding(cfg.num_classes, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))  # learned null class for CFG
        # z_proj embeds reference-image tokens; 1-step models never see images, so there it is frozen and unused
        # (kept for checkpoint compatibility; the official gradient is exactly zero).
        self.z_proj = nn.Linear(cfg.vae_embed_dim * cfg.patch_size**2, D)
        self.z_proj.requires_grad_(cfg.mrar)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.block_len if cfg.mrar else 1, D))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.buffer_size + cfg.seq_len, D))
        self.encoder_blocks = nn.ModuleList(
            AttentionBlock(D, cfg.encoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.encoder_depth)
        )
        self.encoder_norm = nn.LayerNorm(D, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len, D))  # added to the encoder output
        self.diffdecoder = DiffDecoder(cfg)
        if cfg.mrar:
            mask = block_causal_mask(cfg.buffer_size, cfg.block_len, cfg.mrar_images)
            self.register_buffer("attn_mask", mask, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.diffusion_pos_embed_learned, std=0.02)
        dec_pos = self.diffdecoder.net.diffusion_pos_embed_learned  # (1, N, D)
        if self.cfg.decoder_sincos_pos:
            grid = self.cfg.latent_size // self.cfg.decoder_patch_size
            with torch.no_grad():
                dec_pos.copy_(build_sincos2d_pos_embed([grid, grid], dec_pos.shape[-1])[None])
        else:
            nn.init.normal_(dec_pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        final = self.diffdecoder.net.final_layer.linear
        nn.init.zeros_(final.weight)
        nn.init.zeros_(final.bias)

    def fsdp_blocks(self) -> list[nn.Module]:
        """Transformer blocks to wrap/shard individually under FSDP."""
        return [*self.encoder_blocks, *self.diffdecoder.net.res_blocks]

    # ---- token layout ----------------------------------------------------------------------------------------------
    def patchify(self, z: Tensor, p: int) -> Tensor:
        """(B, C, h, w) -> (B, (h/p)(w/p), C p p), feature order (c, p, q) as in MAR."""
        return rearrange(z, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)

    def unpatchify(self, x: Tensor, p: int) -> Tensor:
        hw = self.cfg.latent_size // p
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=hw, w=hw, p=p, q=p)

    def class_embedding(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B,) -> (B, D); in training, replaced by `fake_latent` with probability label_drop_prob (CFG dropout)."""
        emb = self.class_emb(labels)
        if self.training and self.cfg.label_drop_prob > 0:
            drop = _rand((labels.shape[0],), generator, labels.device) < self.cfg.label_drop_prob  # (B,)
            emb = torch.where(drop[:, None], self.fake_latent.to(emb.dtype), emb)
        return emb

    def forward_encoder(self, class_emb: Tensor, refs: Tensor | None = None) -> Tensor:
        """Semantic features c. class_emb (B, D); refs (B, K, T, C p^2): K <= n-1 MRAR reference images as tokens.

        Returns (B, seq_len, D) for 1-step, (B, (K+1) * block_len, D) for MRAR (+ diffusion_pos_embed_learned).
        """
        cfg = self.cfg
        B = class_emb.shape[0]
        buffer = class_emb[:, None].expand(B, cfg.buffer_size, -1)  # (B, buffer, D)
        parts = [buffer, self.mask_token.expand(B, cfg.block_len, -1)]
        if refs is not None and refs.shape[1] > 0:
            parts.append(self.z_proj(refs.flatten(1, 2)))  # (B, K * T, D)
        x = torch.cat(parts, dim=1)  # (B, L, D)
        L = x.shape[1]
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, :L])
        mask = self.attn_mask[:L, :L] if cfg.mrar else None
        for block in self.encoder_blocks:
            if cfg.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self.encoder_norm(x)[:, cfg.buffer_size :]  # (B, L - buffer, D)
        return x + self.diffusion_pos_embed_learned[:, : x.shape[1]]

    # ---- training ----------------------------------------------------------------------------------------------------
    def forward(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Flow-matching loss on scaled VAE latents: (B, C, h, w), or for MRAR (B, n, C, h, w) = n images of a class.

        MRAR is teacher-forced: image k is denoised conditioned on the features of blocks 0..k, whose inputs are the
        ground-truth images 0..k-1; the n losses are averaged.
        """
        cfg = self.cfg
        c_emb = self.class_embedding(labels, generator)
        if not cfg.mrar:
            return self.flow_loss(latents, self.forward_encoder(c_emb), generator)
        B, n = latents.shape[:2]
        refs = self.patchify(latents[:, :-1].flatten(0, 1), cfg.patch_size).unflatten(0, (B, n - 1))  # (B,n-1,T,Cpp)
        c = self.forward_encoder(c_emb, refs)  # (B, n * T, D)
        losses = [self.flow_loss(latents[:, k], c[:, : (k + 1) * cfg.block_len], generator) for k in range(n)]
        return torch.stack(losses).mean()

    def flow_loss(self, latents: Tensor, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """latents (B, C, h, w), c (B, M, D): each pair repeated diffusion_batch_mul times with its own noise and t."""
        x0 = self.patchify(latents, self.cfg.decoder_patch_size)  # (B, N, C_tok)
        mul = self.cfg.diffusion_batch_mul
        return self.diffdecoder.loss(x0.repeat(mul, 1, 1), c.repeat(mul, 1, 1), generator=generator)

    # ---- sampling ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        num_steps: int = 100,
        cfg: float | Sequence[float] = 1.0,
        scale_0: float = 1.0,
        scale_1: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """labels (B,) -> scaled latents (B, C, h, w). Call in eval mode.

        MRAR runs n rounds; round k is conditioned on the k images generated before (also in the unconditional CFG
        branch), all rounds start from the same initial noise, and `cfg` may give one scale per round. The last
        round's image is returned.
        """
        rounds = self.cfg.mrar_images if self.cfg.mrar else 1
        cfgs = list(cfg) if isinstance(cfg, Sequence) else [cfg] * rounds
        if len(cfgs) != rounds:
            raise ValueError(f"cfg has {len(cfgs)} values; this model samples in {rounds} rounds")
        B, device = labels.shape[0], labels.device
        c_emb = self.class_embedding(labels)  # (B, D)
        token_dim = self.cfg.vae_embed_dim * self.cfg.decoder_patch_size**2
        noise = _randn((B, self.cfg.num_decoder_tokens, token_dim), generator, device)  # shared by all rounds
        refs: list[Tensor] = []  # generated images as encoder tokens, (B, T, C p^2) each
        for k in range(rounds):
            r = torch.stack(refs, dim=1) if refs else None  # (B, k, T, C p^2)
            if cfgs[k] != 1.0:
                null = self.fake_latent.expand(B, -1).to(c_emb.dtype)
                c = self.forward_encoder(torch.cat([c_emb, null]), None if r is None else torch.cat([r, r]))
            else:
                c = self.forward_encoder(c_emb, r)
            x = self.diffdecoder.sample(c, noise, num_steps, cfgs[k], scale_0, scale_1, generator)  # (B, N, C_tok)
            image = self.unpatchify(x, self.cfg.decoder_patch_size)  # (B, C, h, w)
            refs.append(self.patchify(image, self.cfg.patch_size))
        return image


def build_transdiff(name_or_cfg: str | TransDiffConfig, **overrides) -> TransDiff:
    """A TransDiff from a preset name in TRANSDIFF_CONFIGS (or a config), with field overrides."""
    cfg = TRANSDIFF_CONFIGS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    return TransDiff(replace(cfg, **overrides))


def load_transdiff_weights(model: TransDiff, path: str, ema: bool = True, strict: bool = True) -> LoadReport:
    """Load an official TransDiff checkpoint (`checkpoint-last.pth`) into `model`, checking every key and shape.

    ema=True takes `model_ema` when present, else `model` (the released files hold one copy, under `model`);
    ema=False takes `model`. strict=False loads what fits and returns the report (e.g. 1-step -> MRAR fine-tune).
    """
    prefer = ("model_ema", "model", "state_dict") if ema else ("model", "state_dict")
    sd = extract_state_dict(safe_torch_load(path), prefer=prefer)
    return load_state_dict_strict(model, {k: v.float() for k, v in sd.items()}, source=path, strict=strict)

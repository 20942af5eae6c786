"""KL-16 VAE used by MAR and TransDiff (LDM AutoencoderKL, 16x downsampling, 16 latent channels).

State-dict keys match MAR's `kl16.ckpt` (`encoder.down.{i}.block.{j}.conv1.weight`, `quant_conv.weight`, ...), so the
released file loads with strict key checking through `load_kl16`. `IdentityAutoencoder` is a pixel-space stand-in with
the same interface, used by the CPU demo where the real weights cannot be downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load

KL16_URL = "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=0"
KL16_ENV = "ARDIFF_KL16"


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; len - 1 downsamplings (stride 16)
    num_res_blocks: int = 2
    embed_dim: int = 16  # latent channels
    encoder_attn_resolutions: tuple[int, ...] = (16,)  # LDM places attention by feature-map size at `resolution`
    resolution: int = 256


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in LDM


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks (+ attention after each), then an optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)  # `downsample` / `upsample`, as in the checkpoint keys

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        ch_in, res, n = cfg.ch, cfg.resolution, len(cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            ch_out = cfg.ch * mult
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(ch_out) for _ in blocks] if res in cfg.encoder_attn_resolutions else []
            self.down.append(Level(blocks, attns, Downsample(ch_out) if i < n - 1 else None, "downsample"))
            ch_in, res = ch_out, (res // 2 if i < n - 1 else res)
        self.mid = Mid(ch_in)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 2 * cfg.embed_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, ch_in, 3, padding=1)
        self.mid = Mid(ch_in)
        levels = []  # built from the lowest resolution up; stored highest-resolution first (LDM's `up` order)
        for i in reversed(range(len(cfg.ch_mult))):
            ch_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, [], Upsample(ch_out) if i > 0 else None, "upsample"))
            ch_in = ch_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments (B, 2C, h, w); logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean


class KL16VAE(nn.Module):
    """LDM AutoencoderKL as configured by MAR: images in [-1, 1] <-> unscaled latents (B, 16, H/16, W/16)."""

    scale_factor = 0.2325  # latents are multiplied by this for training (unit std; MAR/TransDiff)

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)
        self.embed_dim = cfg.embed_dim
        self.stride = 2 ** (len(cfg.ch_mult) - 1)

    def encode_moments(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/s, W/s): posterior mean ‖ logvar."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*s, w*s), roughly in [-1, 1] (not clipped)."""
        return self.decoder(self.post_quant_conv(z))


class IdentityAutoencoder(nn.Module):
    """Pixel-space stand-in for the VAE: the "latent" is the image itself (3 channels, stride 1, scale 1)."""

    scale_factor = 1.0

    def __init__(self):
        super().__init__()
        self.embed_dim = 3
        self.stride = 1

    def encode_moments(self, x: Tensor) -> Tensor:
        return torch.cat([x, torch.full_like(x, -30.0)], dim=1)  # (B, 6, H, W): a (numerically) point posterior

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x))

    def decode(self, z: Tensor) -> Tensor:
        return z


def load_kl16(path: str | os.PathLike | None = None) -> KL16VAE:
    """Build the KL-16 VAE and load MAR's `kl16.ckpt` (from `path`, else $ARDIFF_KL16); frozen, in eval mode.

    The file's `model` dict must match exactly, except LDM training-loss entries (`loss.*`, e.g. the discriminator
    and LPIPS weights), which are dropped.
    """
    path = path or os.environ.get(KL16_ENV)
    if not path or not os.path.isfile(path):
        where = f"{str(path)!r} does not exist" if path else f"no path given and ${KL16_ENV} is not set"
        raise FileNotFoundError(
            f"KL-16 VAE weights not found: {where}. Download MAR's kl16.ckpt from {KL16_URL} "
            "(also re-hosted as vae/checkpoint-last.pth at huggingface.co/zhendch/Transdiff), then pass its path "
            f"(vae_path / --vae) or set {KL16_ENV}=/path/to/kl16.ckpt."
        )
    sd = extract_state_dict(safe_torch_load(path), prefer=("model", "state_dict"))
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    vae = KL16VAE()
    load_state_dict_strict(vae, sd, source=os.fspath(path))
    return vae.eval().requires_grad_(False)

"""TransDiff / MRAR training and sampling (see models/transdiff.py for the network)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_modules.base import GenerativeModule
from models.presets import config_dict, resolve_config
from models.transdiff import TRANSDIFF_CONFIGS, TransDiff, TransDiffConfig
from models.vae import KL16VAE, DiagonalGaussian, IdentityAutoencoder, load_kl16


def group_same_class(
    x: Tensor, labels: Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """MRAR groups from a flat batch: every sample whose class has >= n members in the batch becomes the last image
    of a group whose n-1 references are other, randomly chosen samples of its class.

    x (B, ...) -> (G, n, ...), labels (G,). Only for small-class-count data (the demo); ImageNet needs grouped batches.
    """
    groups = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        for j in range(len(idx) if len(idx) >= n else 0):
            others = idx[torch.arange(len(idx), device=idx.device) != j]
            pick = torch.randperm(len(others), generator=generator)[: n - 1].to(idx.device)
            groups.append(torch.cat([others[pick], idx[j : j + 1]]))
    if not groups:
        raise ValueError(f"MRAR needs {n} images of one class per group; no class has {n} samples in this batch")
    index = torch.stack(groups)  # (G, n)
    return x[index], labels[index[:, 0]]


class TransDiffModule(GenerativeModule):
    """TransDiff (1-step AR) or MRAR training on `image` batches (through the frozen VAE) or cached `moments`.

    Args:
        arch: a preset of `models.transdiff.TRANSDIFF_CONFIGS` (transdiff_base/large/huge[_mrar], tiny[_mrar]), a
            `TransDiffConfig`, or a dict of its fields (optionally with `preset:`); the CLI prints it resolved.
        arch_overrides: `TransDiffConfig` fields to change (e.g. grad_checkpointing, diffusion_batch_mul).
        num_classes, image_size: "data" takes the DataModule's (its class count, e.g. read from the shards' class
            index; its image size) when fit starts; an int sets it; None keeps the preset's. The resolved values
            are stored in the checkpoint's hyperparameters.
        vae: "kl16" (MAR's KL-16, weights from `vae_path` or $ARDIFF_KL16) or "identity" (pixel space).
        num_steps, cfg, scale_0, scale_1: sampling defaults (official sampler; cfg may be per MRAR round).
        encoder_lr_scale: lr multiplier of the encoder (everything outside `diffdecoder`); official: 1. Small models
            trained for a few hundred steps need ~0.1: at the full lr the encoder's first updates turn c into one
            vector common to all classes (the class information is lost before the decoder learns to use it).
        Optimiser and EMA arguments: see `GenerativeModule` (official: betas (0.9, 0.95), weight_decay 0.02,
        blr 1e-4, constant schedule after warmup, EMA 0.9999).
    """

    def __init__(
        self,
        arch: TransDiffConfig | str = "transdiff_large",
        arch_overrides: dict[str, Any] | None = None,
        num_classes: int | Literal["data"] | None = None,
        image_size: int | Literal["data"] | None = None,
        vae: Literal["kl16", "identity"] = "kl16",
        vae_path: str | None = None,
        num_steps: int = 100,
        cfg: float | list[float] = 1.3,
        scale_0: float = 1.0,
        scale_1: float = 1.0,
        weight_decay: float = 0.02,
        betas: tuple[float, float] = (0.9, 0.95),
        encoder_lr_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(weight_decay=weight_decay, betas=betas, **kwargs)
        if not isinstance(arch, str):  # the CLI passes the resolved config: store plain fields in the hparams
            arch = config_dict(resolve_config(TransDiffConfig, TRANSDIFF_CONFIGS, arch))
        self.save_hyperparameters()
        config = resolve_config(TransDiffConfig, TRANSDIFF_CONFIGS, arch, arch_overrides)
        if isinstance(num_classes, int):
            config = replace(config, num_classes=num_classes)
        if isinstance(image_size, int):
            config = replace(config, img_size=image_size)
        self.from_data = {k: v for k, v in (("num_classes", num_classes), ("image_size", image_size)) if v == "data"}
        self.net = TransDiff(config)
        self.num_classes, self.image_size = config.num_classes, config.img_size
        self.vae_kind, self.vae_path = vae, vae_path
        self._vae: list[nn.Module] = []  # not a submodule: kept out of checkpoints, EMA, optimizer and DDP/FSDP
        self.sample_kwargs = dict(num_steps=num_steps, cfg=cfg, scale_0=scale_0, scale_1=scale_1)
        self.encoder_lr_scale = encoder_lr_scale
        self.init_ema()

    # ---- VAE ---------------------------------------------------------------------------------------------------------
    @property
    def vae(self) -> KL16VAE | IdentityAutoencoder:
        """The frozen autoencoder (loaded on first use), on this module's device."""
        if not self._vae:
            self._vae.append(load_kl16(self.vae_path) if self.vae_kind == "kl16" else IdentityAutoencoder())
        vae = self._vae[0]
        param = next(vae.parameters(), None)
        if param is not None and param.device != self.device:
            vae.to(self.device)
        return vae

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        resolved = {k: int(getattr(dm, k)) for k in self.from_data if getattr(dm, k, None) is not None}
        if resolved:
            cfg = replace(self.net.cfg, **{"img_size" if k == "image_size" else k: v for k, v in resolved.items()})
            if cfg != self.net.cfg:  # rebuilt before any weights are loaded (init_from / resume come later)
                self.net = TransDiff(cfg)
                self.init_ema()
                self.num_classes, self.image_size = cfg.num_classes, cfg.img_size
            self.hparams.update(resolved)  # checkpoints rebuild the same network
        super().setup(stage)
        self.vae  # noqa: B018  (fail at start-up, not at the first sample, when the VAE weights are missing)

    @torch.no_grad()
    def latents(self, batch: dict[str, Tensor]) -> Tensor:
        """Scaled latents sampled from the posterior: (B, C, h, w), or (B, n, C, h, w) for grouped MRAR batches."""
        x = batch["moments"] if "moments" in batch else batch["image"]
        grouped = x.ndim == 5
        flat = x.flatten(0, 1) if grouped else x
        posterior = DiagonalGaussian(flat) if "moments" in batch else self.vae.encode(flat)
        z = posterior.sample() * self.vae.scale_factor
        return z.unflatten(0, x.shape[:2]) if grouped else z

    # ---- training ----------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        z, labels = self.latents(batch), batch["label"]
        if self.net.cfg.mrar and z.ndim == 4:
            z, labels = group_same_class(z, labels, self.net.cfg.mrar_images)
        return self.net(z, labels), {}

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Official rule: no decay for 1-D tensors, biases, and anything in the diffusion decoder."""
        return param.ndim < 2 or name.endswith(".bias") or "diffdecoder" in name

    def lr_scale(self, name: str, param: nn.Parameter) -> float:
        return 1.0 if name.startswith("diffdecoder.") else self.encoder_lr_scale

    def fsdp_blocks(self, net: nn.Module) -> list[nn.Module]:
        return net.fsdp_blocks()

    # ---- sampling ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(
        self, labels: Tensor, generator: torch.Generator | None = None, **overrides: float | Sequence[float]
    ) -> Tensor:
        """labels (B,) -> images (B, 3, H, W) in [-1, 1], with the EMA weights when present.

        overrides: num_steps, cfg, scale_0, scale_1 (defaults from the constructor).
        """
        with self.sampling() as net:
            z = net.sample(labels, generator=generator, **{**self.sample_kwargs, **overrides})  # (B, C, h, w)
        vae = self.vae
        return vae.decode(z / vae.scale_factor).float().clamp(-1, 1)

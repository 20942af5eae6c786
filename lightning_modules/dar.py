"""D-AR training: stage 1 the sequential diffusion tokenizer, stage 2 the LlamaGen-style GPT on its tokens.

Stage 1 loss (official vq_loss.py / paper Eq. 7): flow matching + VQ (codebook + 0.25 commitment, masked to the
sampled group's prefix) + 0.5 LPIPS(x, one-step x1 estimate) + 0.5 REPA(DINOv2 ViT-B/14 patch features). The LPIPS
and REPA networks need pretrained weights (see `load_lpips`, `load_dinov2`); set their weights to 0 to train
without them (the CPU demo does).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchvision.utils import make_grid

from lightning_modules.base import GenerativeModule
from models.checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load
from models.dar_gpt import DAR_GPT_CONFIGS, DARGPT, GPTConfig, bf16_inference_copy, sample_tokens
from models.dar_tokenizer import (
    DARTokenizer,
    DARTokenizerConfig,
    build_dar_tokenizer,
    dar_tokenizer_from_official,
    load_dar_tokenizer,
    make_tokenizer_config,
)
from models.presets import config_dict, resolve_config

#################################################################################
#                 Frozen loss networks (pretrained weights needed)              #
#################################################################################


def resolve_weights(path: str | None, env: str, cache_name: str, what: str, how: str) -> str:
    """An explicit path, else $env, else `<torch hub dir>/checkpoints/<cache_name>`; a clear error if none exists."""
    candidates = [path, os.environ.get(env), os.path.join(torch.hub.get_dir(), "checkpoints", cache_name)]
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
    layers (`vgg.pth`, shipped as tokenizer/tokenizer_image/cache/vgg.pth in showlab/D-AR). Strict keys."""
    vgg_file = resolve_weights(
        vgg_path, "ARDIFF_VGG16_PATH", "vgg16-397923af.pth", "VGG16 (LPIPS)",
        "Download https://download.pytorch.org/models/vgg16-397923af.pth and pass lpips_vgg_path.",
    )  # fmt: skip
    lin_file = resolve_weights(
        lin_path, "ARDIFF_LPIPS_PATH", "vgg.pth", "LPIPS linear layers",
        "Take vgg.pth from showlab/D-AR (tokenizer/tokenizer_image/cache/vgg.pth) and pass lpips_lin_path.",
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


#################################################################################
#                          Stage 1: the tokenizer                               #
#################################################################################


class DARTokenizerModule(GenerativeModule):
    """D-AR tokenizer training (official recipe: Adam(W) wd 0, betas (0.9, 0.95), lr 2e-4, 500 warmup steps then
    constant, grad clip 1.0 (set in the trainer), EMA 0.999).

    Args:
        config / config_overrides: tokenizer size (`DAR_TOKENIZER_CONFIGS` name) and field overrides.
        lpips_weight / repa_weight: loss weights (official 0.5 / 0.5); 0 skips the network and its weights.
        lpips_vgg_path / lpips_lin_path / repa_weights_path: pretrained weights (else env vars / torch hub cache).
        recon_every_n_steps: TensorBoard rows input | reconstruction | previews from 1/4, 1/2, 3/4 of the tokens.
    """

    def __init__(
        self,
        config: DARTokenizerConfig | str = "v1",
        config_overrides: dict[str, Any] | None = None,
        lpips_weight: float = 0.5,
        repa_weight: float = 0.5,
        lpips_vgg_path: str | None = None,
        lpips_lin_path: str | None = None,
        repa_weights_path: str | None = None,
        recon_every_n_steps: int = 1000,
        num_recon: int = 4,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 500,
        lr_schedule: str = "constant",
        ema_decay: float | None = 0.999,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
            ema_decay=ema_decay, **kwargs,
        )  # fmt: skip
        if not isinstance(config, str):  # the CLI passes the resolved config: store plain fields in the hparams
            config = config_dict(make_tokenizer_config(config))
        self.save_hyperparameters()
        self.cfg = make_tokenizer_config(config, config_overrides)
        self.num_classes, self.image_size = 1, self.cfg.image_size
        self.lpips_weight, self.repa_weight = lpips_weight, repa_weight
        self.recon_every_n_steps, self.num_recon = recon_every_n_steps, num_recon
        self.weight_paths = {"vgg": lpips_vgg_path, "lin": lpips_lin_path, "repa": repa_weights_path}
        self.loss_nets: dict[str, nn.Module] = {}  # frozen; kept out of the module tree (not in checkpoints)
        self.net = DARTokenizer(self.cfg)
        if repa_weight == 0:
            # the REPA projector stays in the state dict (official key layout) but gets no gradient without REPA:
            # freeze it, so the optimizer skips it and DDP does not wait for its gradients
            self.net.diff_decoder.net.repa_out.requires_grad_(False)
        self.init_ema()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":  # fail at start, not at the first step, when pretrained weights are missing
            self.loss_net("lpips")
            self.loss_net("repa")

    def loss_net(self, name: str) -> nn.Module | None:
        if name == "lpips" and self.lpips_weight > 0 and name not in self.loss_nets:
            self.loss_nets[name] = load_lpips(self.weight_paths["vgg"], self.weight_paths["lin"])
        if name == "repa" and self.repa_weight > 0 and name not in self.loss_nets:
            self.loss_nets[name] = load_dinov2(self.weight_paths["repa"])
        net = self.loss_nets.get(name)
        return None if net is None else net.to(self.device)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["image"]
        out = self.net(x)
        loss = out["fm_loss"] + out["vq_loss"] + out["commit_loss"]
        logs = {k: out[k] for k in ("fm_loss", "vq_loss", "commit_loss", "codebook_usage")}
        lpips = self.loss_net("lpips")
        if lpips is not None:
            lpips.train(self.training)  # official (vq_loss.train()): the lin layers' Dropout(0.5) is active in training
            logs["lpips"] = lpips(x.float(), out["x1_hat"].float()).mean()
            loss = loss + self.lpips_weight * logs["lpips"]
        dino = self.loss_net("repa")
        if dino is not None:
            with torch.no_grad():
                target = dino(x)  # (B, 256, C): 16 x 16 patches
                side = int(out["h_repa"].shape[1] ** 0.5)
                if side != 16:  # small demo configs tap a coarser grid: pool the targets to it
                    grid = rearrange(target, "b (h w) c -> b c h w", h=16)
                    target = rearrange(F.adaptive_avg_pool2d(grid, side), "b c h w -> b (h w) c")
            logs["repa"] = (1 - F.cosine_similarity(out["h_repa"].float(), target.float(), dim=-1)).mean()
            loss = loss + self.repa_weight * logs["repa"]
        return loss, logs

    @torch.no_grad()
    def reconstruction_rows(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) -> (5B, 3, H, W): input, reconstruction, previews from 1/4, 1/2, 3/4 of the tokens."""
        with self.sampling() as net:
            ids = net.encode_tokens(x)
            n = ids.shape[1]
            seed = int(torch.randint(0, 2**31, (1,), generator=generator)) if generator is not None else 0
            gen = lambda: torch.Generator().manual_seed(seed)  # one trajectory for all rows
            previews = [net.decode_prefix(ids[:, : n * k // 4], gen()) for k in (1, 2, 3)]
            return torch.cat([x, net.decode_tokens(ids, gen()), *previews])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        step = self.global_step
        if not self.recon_every_n_steps or step % self.recon_every_n_steps:
            return
        rows = self.reconstruction_rows(batch["image"][: self.num_recon]).clamp(-1, 1) * 0.5 + 0.5
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    grid = make_grid(rows.float().cpu(), nrow=rows.shape[0] // 5)
                    logger.experiment.add_image("reconstructions/input|recon|1/4|1/2|3/4", grid, step)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["image"]
        with self.sampling() as net:
            rec = net.reconstruct(x, torch.Generator().manual_seed(batch_idx))
        mse = F.mse_loss(rec.clamp(-1, 1).float(), x.float())
        self.log("val/recon_mse", mse, batch_size=x.shape[0], sync_dist=True)
        self.log("val/psnr", 10 * torch.log10(4.0 / mse), batch_size=x.shape[0], sync_dist=True)

    @torch.no_grad()
    def sample_images(self, labels: Tensor, generator: torch.Generator | None = None, **overrides: Any) -> Tensor:
        """Unconditional decodes of uniformly random token sequences (labels only set the count): keeps the
        sampling interface working on a tokenizer run; real samples come from DARGPTModule."""
        ids = torch.randint(0, self.cfg.codebook_size, (labels.shape[0], self.cfg.num_tokens), generator=generator)
        with self.sampling() as net:
            return net.decode_tokens(ids.to(self.device), generator, overrides.get("steps"))


#################################################################################
#                            Stage 2: the GPT                                   #
#################################################################################


class DARGPTModule(GenerativeModule):
    """D-AR GPT training on the frozen tokenizer's tokens (paper recipe: AdamW lr 4e-4, wd 0.05, betas (0.9, 0.95),
    batch 1024, constant then linear decay to 1e-5 over the last 60K of 360K steps as the official script).

    Batches: `{"tokens", "label"}` from a token cache, or `{"image", "label"}` tokenised on the fly (fp32, frozen).
    Args:
        gpt / gpt_overrides: GPT size (`DAR_GPT_CONFIGS` name) and field overrides.
        tokenizer_path: an official tokenizer file or a DARTokenizerModule checkpoint (EMA weights); needed for
            image batches and for `sample_images`. tokenizer_config: override its config (name), else from the file.
        cfg_start / cfg_end: linear CFG schedule over the tokens (paper: 1.1 -> 8.0 L, 1.1 -> 10.0 XL).
        decode_steps: tokenizer denoising steps (None = its default, 8).
        sample_bf16: sample the GPT under bf16 autocast; sample_bf16_weights: with a bf16-weight copy of it instead
            (the official sampler's bf16 GPT; faster where bf16 matmuls are native). The tokenizer decodes in fp32.
    """

    def __init__(
        self,
        gpt: GPTConfig | str = "L",
        gpt_overrides: dict[str, Any] | None = None,
        tokenizer_path: str | None = None,
        tokenizer_config: str | None = None,
        cfg_start: float = 1.1,
        cfg_end: float = 8.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        decode_steps: int | None = None,
        sample_bf16: bool = False,
        sample_bf16_weights: bool = False,
        lr: float = 4e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        lr_schedule: str = "linear",
        decay_start_step: int = 300_000,
        total_steps: int | None = 360_000,
        min_lr: float = 1e-5,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, weight_decay=weight_decay, betas=betas, lr_schedule=lr_schedule, decay_start_step=decay_start_step,
            total_steps=total_steps, min_lr=min_lr, ema_decay=ema_decay, **kwargs,
        )  # fmt: skip
        if not isinstance(gpt, str):  # the CLI passes the resolved config: store plain fields in the hparams
            gpt = config_dict(resolve_config(GPTConfig, DAR_GPT_CONFIGS, gpt))
        self.save_hyperparameters()
        self.cfg = resolve_config(GPTConfig, DAR_GPT_CONFIGS, gpt, gpt_overrides)
        self.num_classes = self.cfg.num_classes
        self.tokenizer_path, self.tokenizer_config = tokenizer_path, tokenizer_config
        self.sample_kwargs = dict(
            cfg_start=cfg_start, cfg_end=cfg_end, temperature=temperature, top_k=top_k, top_p=top_p
        )
        self.decode_steps, self.sample_bf16, self.sample_bf16_weights = decode_steps, sample_bf16, sample_bf16_weights
        self._tokenizer: list[DARTokenizer] = []  # frozen; kept out of the module tree (not in checkpoints)
        self.net = DARGPT(self.cfg)
        self.init_ema()

    @property
    def image_size(self) -> int:
        return self.tokenizer.cfg.image_size

    @property
    def tokenizer(self) -> DARTokenizer:
        if not self._tokenizer:
            if self.tokenizer_path is None:
                raise ValueError("DARGPTModule needs model.init_args.tokenizer_path for image batches and sampling")
            tok = load_tokenizer_checkpoint(self.tokenizer_path, self.tokenizer_config).requires_grad_(False)
            if tok.cfg.num_tokens != self.cfg.block_size or tok.cfg.codebook_size != self.cfg.vocab_size:
                raise ValueError(
                    f"tokenizer {self.tokenizer_path} makes {tok.cfg.num_tokens} tokens from {tok.cfg.codebook_size} "
                    f"codes; the GPT expects block_size {self.cfg.block_size}, vocab_size {self.cfg.vocab_size}"
                )
            self._tokenizer.append(tok)
        return self._tokenizer[0].to(self.device)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.tokenizer_path is not None:
            self.tokenizer  # noqa: B018  (load now: fail early on a bad path)

    @torch.no_grad()
    def tokens_of(self, batch: dict[str, Tensor]) -> Tensor:
        if "tokens" in batch:
            return batch["tokens"].long()
        with torch.autocast(self.device.type, enabled=False):
            return self.tokenizer.encode_tokens(batch["image"].float())

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = self.tokens_of(batch)
        logits = self.net(tokens, batch["label"])  # (B, N, V) fp32
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        acc = (logits.detach().argmax(-1) == tokens).float().mean()
        return loss, {"token_acc": acc, "perplexity": loss.detach().exp()}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        tokens = self.tokens_of(batch)
        with self.sampling() as net:
            logits = net(tokens, batch["label"])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        n = tokens.shape[0]
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        self.log("val/token_acc", (logits.argmax(-1) == tokens).float().mean(), batch_size=n, sync_dist=True)

    @torch.no_grad()
    def sample_images(self, labels: Tensor, generator: torch.Generator | None = None, **overrides: Any) -> Tensor:
        """labels (B,) -> images (B, 3, H, W) in [-1, 1]: GPT tokens (KV cache, linear CFG) + tokenizer decode.
        overrides: any `iter_tokens` argument (cfg_start, cfg_end, temperature, top_k, top_p, use_kv_cache)."""
        kwargs = {**self.sample_kwargs, **overrides}
        if self.sample_bf16:
            kwargs.setdefault("autocast_dtype", torch.bfloat16)
        with self.sampling() as net:
            net = bf16_inference_copy(net) if self.sample_bf16_weights else net
            tokens = sample_tokens(net, labels.to(self.device), generator=generator, **kwargs)
        return self.tokenizer.decode_tokens(tokens, generator, self.decode_steps)


def load_tokenizer_checkpoint(
    path: str, config: DARTokenizerConfig | str | None = None, use_ema: bool = True
) -> DARTokenizer:
    """A D-AR tokenizer from an official file (`models.dar_tokenizer.load_dar_tokenizer`) or from the Lightning
    checkpoint of a `DARTokenizerModule` run (EMA weights when present and use_ema; config from its hparams)."""
    if not os.path.isfile(path):
        return load_dar_tokenizer(path, config, use_ema)  # its not-found message names both kinds of file
    ckpt = safe_torch_load(path)
    if not (isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt):
        return dar_tokenizer_from_official(ckpt, config, use_ema, source=path)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: Lightning checkpoint without `state_dict`")
    state = ckpt["state_dict"]
    prefix = "ema_net." if use_ema and any(k.startswith("ema_net.") for k in state) else "net."
    sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    hp = ckpt.get("hyper_parameters") or {}
    stored = make_tokenizer_config(hp["config"], hp.get("config_overrides")) if "config" in hp else None
    return build_dar_tokenizer(sd, config or stored, source=path)

"""Released checkpoints -> a sampling-ready LightningModule, with the official evaluation settings as named presets.

    ardiff sample --preset transdiff_large --ckpt checkpoint-last.pth --vae kl16.ckpt --out samples.npz
    ardiff sample --preset dar_XL --ckpt D-AR-XL-360K.pt --tokenizer D-AR-tokenizer_v1.pt --out samples.npz

TransDiff / MRAR files are what the official `main.py` saves (`{'model', 'model_ema', 'optimizer', 'epoch', 'args'}`;
EMA weights are taken, as the official evaluation does); D-AR GPT files what `train_c2i.py` saves (`{'model',
'optimizer', 'steps', 'args'}`, `model` as the samplers read it) and the tokenizer what its trainer saves (`ema` >
`model`, pickled `config` read without executing code).

Sampling settings (notes on the official code: /work/shared/notes/{transdiff,dar}.md):
- TransDiff / MRAR: README "More settings for Benchmark in paper" (cfg, scale_0, scale_1); 100 Euler-Maruyama steps
  (`evaluate()` never passes --num_sampling_steps, so `samples()`' default 100 is used). MRAR: one cfg for all 4
  rounds as `evaluate` passes it; `--set cfg=[a,b,c,d]` gives one per round.
- D-AR: paper Table 4 linear CFG 1.1 -> 8.0 (L) / 1.1 -> 10.0 (XL), temperature 1, no top-k (0), no top-p (1.0), GPT
  in bf16 with fp32 logits; tokenizer decodes with its 8 default steps. (The repo's eval_c2i_fid.sh uses 1.2 -> 8.0
  for L: `--set cfg_start=1.2`.)
`tiny` presets are the CPU demo sizes (pixel-space TransDiff; tiny GPT + tiny tokenizer), for trying the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L

from models.checkpoint import CheckpointError


@dataclass(frozen=True)
class OfficialPreset:
    family: str  # "transdiff" | "dar"
    arch: str  # TransDiff arch / D-AR GPT size
    sample: dict[str, Any] = field(default_factory=dict)  # sampling settings of the official evaluation
    tokenizer_config: str | None = None  # D-AR: tokenizer config when the file carries none


def _transdiff(arch: str, cfg: float, scale_0: float, scale_1: float) -> OfficialPreset:
    return OfficialPreset("transdiff", arch, {"num_steps": 100, "cfg": cfg, "scale_0": scale_0, "scale_1": scale_1})


def _dar(gpt: str, cfg_end: float, **extra: Any) -> OfficialPreset:
    sample = {"cfg_start": 1.1, "cfg_end": cfg_end, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "sample_bf16": True}
    return OfficialPreset("dar", gpt, {**sample, **extra.pop("sample", {})}, **extra)


PRESETS: dict[str, OfficialPreset] = {
    "transdiff_base": _transdiff("transdiff_base", 1.30, 0.87, 0.91),
    "transdiff_large": _transdiff("transdiff_large", 1.30, 0.89, 0.95),
    "transdiff_huge": _transdiff("transdiff_huge", 1.23, 0.87, 0.93),
    "transdiff_base_mrar": _transdiff("transdiff_base_mrar", 1.30, 0.87, 0.91),
    "transdiff_large_mrar": _transdiff("transdiff_large_mrar", 1.30, 0.925, 0.95),
    "transdiff_huge_mrar": _transdiff("transdiff_huge_mrar", 1.28, 0.87, 0.91),
    "transdiff_large_512": _transdiff("transdiff_large_512", 1.30, 0.87, 0.87),
    "dar_L": _dar("L", 8.0),
    "dar_XL": _dar("XL", 10.0),
    # CPU demo sizes
    "transdiff_tiny": OfficialPreset("transdiff", "tiny", {"num_steps": 50, "cfg": 2.0}),
    "transdiff_tiny_mrar": OfficialPreset("transdiff", "tiny_mrar", {"num_steps": 50, "cfg": 2.0}),
    "dar_tiny": _dar("tiny", 4.0, sample={"sample_bf16": False}, tokenizer_config="tiny"),
}


def load_official(preset: str, ckpt: str, tokenizer: str | None = None, vae: str | None = None) -> L.LightningModule:
    """The LightningModule of `preset` with the released weights of `ckpt` (EMA for TransDiff) loaded strictly."""
    if preset not in PRESETS:
        raise SystemExit(f"ardiff sample: unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if p.family == "transdiff":
        from lightning_modules.transdiff import TransDiffModule
        from models.transdiff import load_transdiff_weights

        pixel = p.arch.startswith("tiny")
        if not pixel and vae is None:
            raise SystemExit(f"ardiff sample: --preset {preset} decodes with MAR's KL-16 VAE: give --vae kl16.ckpt")
        module = TransDiffModule(arch=p.arch, vae="identity" if pixel else "kl16", vae_path=vae, ema_decay=None,
                                 **p.sample)  # fmt: skip
        _check_official(ckpt, "TransDiff checkpoint-last.pth")
        load_transdiff_weights(module.net, ckpt, ema=True)
        return module
    from lightning_modules.dar import DARGPTModule
    from models.dar_gpt import load_dar_gpt

    if tokenizer is None:
        raise SystemExit(f"ardiff sample: --preset {preset} decodes with the D-AR tokenizer: give --tokenizer FILE")
    module = DARGPTModule(gpt=p.arch, tokenizer_path=tokenizer, tokenizer_config=p.tokenizer_config, ema_decay=None,
                          **p.sample)  # fmt: skip
    _check_official(ckpt, "D-AR GPT *.pt")
    module.net = load_dar_gpt(ckpt, module.cfg)
    module.tokenizer  # noqa: B018  (load it now: a wrong tokenizer file fails before sampling starts)
    return module


def _check_official(path: str, what: str) -> None:
    from models.checkpoint import safe_torch_load

    ckpt = safe_torch_load(path)
    if isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt:
        raise CheckpointError(
            f"{path} is an ardiff Lightning checkpoint, not an official {what}; sample it with "
            "`ardiff sample --config RECIPE.yaml --ckpt` or `--module CLASS --ckpt`"
        )

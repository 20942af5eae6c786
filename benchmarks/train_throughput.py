"""Training-step throughput (images/s) of TransDiff (1-step, MRAR) and D-AR (tokenizer, GPT), random weights.

One step = what `GenerativeModule.training_step` + `optimizer_step` do: `compute_loss` of the real LightningModule
(for the bf16 rows under `lightning_modules.precision.BF16Precision`, what ardiff's `bf16-mixed` and
`AutoBF16Precision` use: bf16 autocast, attention in fp32 on CPU), backward, the AdamW from
`configure_optimizers` (fused where the base module fuses it), the lr scheduler, the EMA update. Logging is left out.
FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on the first (warm-up) step (matmul, conv and
attention FLOPs of forward + backward, recomputation under gradient checkpointing included) and divided by the timed
step to give the achieved rate, reported as a fraction of a dense-matmul rate measured in the same run per dtype
(`dense_peak`). On CPU the counted step runs attention on the math SDPA backend (the counter cannot see the CPU
flash kernel). On a loaded CPU prefer `--threads 1` for the tiny configs (see benchmarks/README.md).

Batches are synthetic: TransDiff tiny trains on 32 px images in pixel space, the official sizes on cached KL-16
latent moments (the VAE is not run); the D-AR tokenizer on images, the GPT on cached tokens. MRAR samples are groups
of `mrar_images` images of one class. The official tokenizer recipe includes LPIPS (VGG16) and REPA (DINOv2 ViT-B/14)
whose pretrained weights are not available here: at the official size both run with random weights (same cost),
the tiny tokenizer trains without them (as the CPU demo).

    python -m benchmarks.train_throughput --quick                 # tiny configs only, ~1-2 min on 2 CPU cores
    python -m benchmarks.train_throughput --json train.json       # + smallest official sizes, fp32 (slow on CPU)
    python -m benchmarks.train_throughput --scales tiny --compile # + torch.compile rows (before/after)
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from benchmarks.common import matmul_peak, report, sync, time_fn
from lightning_modules.base import GenerativeModule
from lightning_modules.dar import DARGPTModule, DARTokenizerModule
from lightning_modules.precision import BF16Precision
from lightning_modules.transdiff import TransDiffModule
from models.dar_gpt import DAR_GPT_CONFIGS
from models.perceptual import DINOV2_ARCHS, LPIPS, DINOv2Features
from models.transdiff import TRANSDIFF_CONFIGS
from models.vae import KL16VAE

COLUMNS = [
    "model", "config", "params_M", "precision", "compiled", "batch", "steps", "s_per_step", "img_per_s",
    "gflop_per_img", "achieved_gflops", "peak_gflops", "pct_of_peak", "load_1m",
]  # fmt: skip


@dataclass
class Case:
    model: str  # "TransDiff 1-step", "TransDiff MRAR", "D-AR tokenizer", "D-AR GPT"
    config: str  # preset name
    scale: str  # "tiny" | "official"
    build: Callable[[], GenerativeModule]
    batch: Callable[[int], dict[str, Tensor]]  # samples -> training batch
    images_per_sample: int = 1  # MRAR: one sample is a group of images of one class


def transdiff_case(arch: str) -> Case:
    cfg = TRANSDIFF_CONFIGS[arch]
    tiny = arch.startswith("tiny")
    n = cfg.mrar_images if cfg.mrar else 1
    group = (n,) if cfg.mrar else ()

    def build() -> GenerativeModule:
        module = TransDiffModule(arch=arch, vae="identity" if tiny else "kl16", total_steps=1000)
        if not tiny:  # cached-latent batches only need the VAE's scale factor; no kl16.ckpt here: random weights
            module._vae.append(KL16VAE().requires_grad_(False).eval())
        return module

    def batch(b: int) -> dict[str, Tensor]:
        labels = torch.randint(0, cfg.num_classes, (b,))
        if tiny:  # pixel space, (B, [n,] 3, 32, 32) in [-1, 1]
            return {"image": torch.rand(b, *group, 3, cfg.img_size, cfg.img_size) * 2 - 1, "label": labels}
        side = cfg.latent_size  # cached KL-16 moments (mean ‖ logvar)
        moments = torch.cat([torch.randn(b, *group, cfg.vae_embed_dim, side, side),
                             torch.full((b, *group, cfg.vae_embed_dim, side, side), -5.0)], dim=-3)  # fmt: skip
        return {"moments": moments, "label": labels}

    name = "TransDiff MRAR" if cfg.mrar else "TransDiff 1-step"
    return Case(name, arch, "tiny" if tiny else "official", build, batch, n)


def dar_tokenizer_case(config: str) -> Case:
    tiny = config == "tiny"

    def build() -> GenerativeModule:
        weight = 0.0 if tiny else 0.5
        module = DARTokenizerModule(
            config=config, lpips_weight=weight, repa_weight=weight, recon_every_n_steps=0, total_steps=1000
        )
        if not tiny:  # the official loss networks, with random weights (their pretrained files are not here)
            module.loss_nets["lpips"] = LPIPS().eval().requires_grad_(False)
            module.loss_nets["repa"] = DINOv2Features(**DINOV2_ARCHS["dinov2_vitb14"]).eval().requires_grad_(False)
        return module

    def batch(b: int) -> dict[str, Tensor]:
        size = 32 if tiny else 256
        return {"image": torch.rand(b, 3, size, size) * 2 - 1, "label": torch.zeros(b, dtype=torch.long)}

    return Case("D-AR tokenizer", config, "tiny" if tiny else "official", build, batch)


def dar_gpt_case(gpt: str) -> Case:
    cfg = DAR_GPT_CONFIGS[gpt]

    def batch(b: int) -> dict[str, Tensor]:  # cached tokens
        tokens = torch.randint(0, cfg.vocab_size, (b, cfg.block_size))
        return {"tokens": tokens, "label": torch.randint(0, cfg.num_classes, (b,))}

    return Case("D-AR GPT", gpt, "tiny" if gpt == "tiny" else "official", lambda: DARGPTModule(gpt=gpt), batch)


CASES = [
    transdiff_case("tiny"),
    transdiff_case("tiny_mrar"),
    dar_tokenizer_case("tiny"),
    dar_gpt_case("tiny"),
    # smallest official sizes: TransDiff-B (1-step, MRAR), the v1 tokenizer, D-AR-L
    transdiff_case("transdiff_base"),
    transdiff_case("transdiff_base_mrar"),
    dar_tokenizer_case("v1"),
    dar_gpt_case("L"),
]


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
    """FLOPs of `aten.convolution_backward`: each requested gradient (input, weight) costs what the forward conv does.
    torch's own formula counts a grouped conv's weight gradient `groups` times over (the demos' depthwise 3x3 convs:
    512x, 70 % of the tiny TransDiff step's counted FLOPs)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flop}


def train_step(module: GenerativeModule, opt: torch.optim.Optimizer, sched, batch: dict[str, Tensor], bf16: bool):
    """compute_loss (under ardiff's bf16 plugin for bf16) -> backward -> optimizer + scheduler step -> EMA update."""
    with BF16Precision(module.device.type).forward_context() if bf16 else nullcontext():
        loss, _ = module.compute_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    module.update_ema()


def measure(case: Case, bf16: bool, compiled: bool, batch_size: int, steps: int, device: str) -> dict:
    """One row: the first step is the warm-up (and the FLOP count, or the compilation), then `steps` timed steps."""
    torch.manual_seed(0)
    module = case.build().to(device)
    if compiled:
        torch._dynamo.reset()  # compile each row from scratch, as a fresh training process does
        module.compile_net = True
        module.configure_model()  # what Lightning calls: `self.net.compile()`
    module.train()
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    batch = {k: v.to(device) for k, v in case.batch(batch_size).items()}
    step = lambda: train_step(module, opt, sched, batch, bf16)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    if compiled:  # FlopCounterMode does not see inside compiled graphs: the eager row of this case counts FLOPs
        step()
        flops = None
    else:  # FlopCounterMode has no formula for the CPU flash-attention kernel: count on the math SDPA backend
        math_sdpa = sdpa_kernel(SDPBackend.MATH) if torch.device(device).type == "cpu" else nullcontext()
        with math_sdpa, FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            step()
        flops = counter.get_total_flops()
    sync(device)
    first_s = time.perf_counter() - start
    seconds = time_fn(step, warmup=0, iters=steps, device=device)
    images = batch_size * case.images_per_sample
    return {
        "model": case.model,
        "config": case.config,
        "params_M": round(sum(p.numel() for p in module.net.parameters()) / 1e6, 2),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "compiled": compiled,
        "batch": f"{batch_size}x{case.images_per_sample}" if case.images_per_sample > 1 else batch_size,
        "steps": steps,
        "first_step_s": first_s,
        "s_per_step": seconds,
        "img_per_s": images / seconds,
        "gflop_per_img": flops / images / 1e9 if flops is not None else None,
        "achieved_gflops": flops / seconds / 1e9 if flops is not None else None,
        "load_1m": round(load, 1),
    }


def dense_peak(dtype: torch.dtype, device: str) -> float:
    """FLOP/s of the faster of `a @ b` (`matmul_peak`) and `F.linear(a, b)` (what nn.Linear runs) on square operands:
    without bf16 hardware, CPU bf16 `a @ b` takes a path ~5-10x slower than bf16 `F.linear`. fp32 at n = 1024;
    bf16 at n = 512 (bf16 `a @ b` at n = 2048 takes minutes per call there)."""
    n = 1024 if dtype == torch.float32 else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    linear = 2 * n**3 / time_fn(lambda: F.linear(a, b), warmup=2, iters=3, device=device)
    return max(matmul_peak(dtype, device, n=n, iters=3), linear)


def plan(
    scales: list[str],
    quick: bool,
    official_bf16: bool,
    only: str | None,
    precisions: list[str],
    tiny_batch: int = 4,
) -> list[tuple[Case, bool, int, int]]:
    """(case, bf16, batch, timed steps) per row. bf16 at the official sizes: one timed step (slow on CPUs without
    AMX / AVX512-BF16)."""
    out = []
    for case in CASES:
        if case.scale not in scales or (only and only.lower() not in f"{case.model} {case.config}".lower()):
            continue
        tiny = case.scale == "tiny"
        batch = tiny_batch if tiny else 1  # same batch in both precisions, so their per-image times compare
        steps = 3 if tiny and not quick else 1
        if "fp32" in precisions:
            out.append((case, False, batch, steps))
        if "bf16" in precisions and (tiny or official_bf16):
            out.append((case, True, batch, steps))
    return out


def rows(
    quick: bool = True,
    scales: list[str] | None = None,
    compile: bool = False,
    official_bf16: bool = False,
    device: str = "cpu",
    only: str | None = None,
    precisions: list[str] | None = None,
    tiny_batch: int = 4,
) -> list[dict]:
    scales = scales or (["tiny"] if quick else ["tiny", "official"])
    todo = plan(scales, quick, official_bf16, only, precisions or ["fp32", "bf16"], tiny_batch)
    if not todo:
        raise ValueError(f"no benchmark case matches scales={scales} only={only!r}")
    dtypes = {torch.bfloat16 if bf16 else torch.float32 for _, bf16, _, _ in todo}
    peaks = {dt: dense_peak(dt, device) for dt in dtypes}
    out = []
    for case, bf16, batch, steps in todo:
        for compiled in (False, True) if compile else (False,):
            try:
                row = measure(case, bf16, compiled, batch, steps, device)
            except Exception as e:  # a compile failure is a result too: report it and go on
                if not compiled:
                    raise
                print(f"  {case.model} {case.config}: torch.compile failed: {type(e).__name__}", flush=True)
                failed = f"failed ({type(e).__name__})"
                precision = "bf16 autocast" if bf16 else "fp32"
                out.append({"model": case.model, "config": case.config, "precision": precision, "compiled": failed})
                continue
            finally:
                gc.collect()  # free this row's model and optimizer state before the next one
            if compiled:  # same math as the eager row just measured
                eager = out[-1]
                row["gflop_per_img"] = eager["gflop_per_img"]
                row["achieved_gflops"] = eager["gflop_per_img"] * row["img_per_s"]
                row["speedup_vs_eager"] = row["img_per_s"] / eager["img_per_s"]
            peak = peaks[torch.bfloat16 if bf16 else torch.float32] / 1e9
            row["peak_gflops"] = peak
            row["pct_of_peak"] = 100 * row["achieved_gflops"] / peak
            out.append(row)
            print(f"  {row['model']} {row['config']} {row['precision']} compiled={compiled}: "
                  f"{row['img_per_s']:.3g} img/s ({row['s_per_step']:.3g} s/step)", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs only, 1 timed step (smoke run)")
    p.add_argument("--scales", default=None, help="comma list of tiny,official (default: tiny,official; --quick: tiny)")
    p.add_argument("--compile", action="store_true", help="also measure each row with torch.compile (net.compile())")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32,bf16")
    p.add_argument("--official-bf16", action="store_true", help="also bf16 at the official sizes (very slow on CPU)")
    p.add_argument("--only", default=None, help="keep cases whose 'model config' contains this text (e.g. GPT)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=4, help="batch of the tiny configs (the CPU demos train at 64)")
    p.add_argument("--json", default="train_throughput.json", help="where to write the rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scales = args.scales.split(",") if args.scales else None
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"device {args.device}, {args.threads} threads, load average {load}", flush=True)
    precisions = args.precision.split(",")
    table = rows(args.quick, scales, args.compile, args.official_bf16, args.device, args.only, precisions, args.batch)
    columns = COLUMNS + (["speedup_vs_eager"] if args.compile else [])
    report(table, args.json, "Training-step throughput (forward + backward + AdamW + EMA)", columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

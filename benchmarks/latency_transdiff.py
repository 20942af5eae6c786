"""TransDiff sampling latency (seconds per image), random weights, CFG on (batch doubled), official sampler.

    python -m benchmarks.latency_transdiff            # quick: tiny rows + TransDiff-B at batch 1 (fp32)
    python -m benchmarks.latency_transdiff --full     # + TransDiff-B at batch 64 and in bf16 (hours on a small CPU)

Cost model: per round, one encoder pass + `num_steps` decoder calls (1 round for 1-step AR, 4 for MRAR, whose
round k encodes k reference images and cross-attends to k+1 feature blocks). Each call is timed on its own
(`enc_s`, `dec_s`, summed over rounds) and `s_per_image` = sum over rounds of (enc + 100 dec) / batch, i.e.
EXTRAPOLATED to 100 steps from single calls. For the tiny model `e2e_s_per_image` times the real `sample()` with 100
steps to check that extrapolation. The VAE decode is not included (tiny runs in pixel space).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine, markdown_table, time_fn
from models.transdiff import TransDiff, build_transdiff

NUM_STEPS = 100


def call_seconds(model: TransDiff, batch: int, dtype: torch.dtype, warmup: int, iters: int) -> tuple[float, float]:
    """(encoder seconds, decoder-call seconds), each summed over the sampling rounds, for `batch` images with CFG."""
    cfg = model.cfg
    n = 2 * batch  # [cond; uncond]
    emb = model.class_emb(torch.zeros(n, dtype=torch.long))
    x = torch.randn(n, cfg.num_decoder_tokens, cfg.vae_embed_dim * cfg.decoder_patch_size**2)
    t = torch.full((n,), 500.0)
    enc_total = dec_total = 0.0
    for k in range(cfg.mrar_images if cfg.mrar else 1):
        refs = torch.randn(n, k, cfg.block_len, cfg.vae_embed_dim * cfg.patch_size**2) if k else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            enc_total += time_fn(lambda: model.forward_encoder(emb, refs), warmup, iters)  # noqa: B023
            c = model.forward_encoder(emb, refs)
            dec_total += time_fn(lambda: model.diffdecoder.net(x, c, t), warmup, iters)  # noqa: B023
    return enc_total, dec_total


def e2e_seconds(model: TransDiff, batch: int) -> float:
    labels = torch.zeros(batch, dtype=torch.long)
    return time_fn(lambda: model.sample(labels, NUM_STEPS, cfg=1.3, generator=torch.Generator().manual_seed(0)), 0, 1)


@torch.no_grad()
def rows(quick: bool = True) -> list[dict]:
    plan = [("tiny", b, d, mrar) for b in (1, 64) for d in ("fp32", "bf16") for mrar in (False, True)]
    plan += [("transdiff_base", 1, "fp32", mrar) for mrar in (False, True)]
    if not quick:
        plan += [("transdiff_base", 1, "bf16", mrar) for mrar in (False, True)]
        plan += [("transdiff_base", 64, d, mrar) for d in ("fp32", "bf16") for mrar in (False, True)]
    out = []
    for name, batch, precision, mrar in plan:
        torch.manual_seed(0)
        model = build_transdiff(name + ("_mrar" if mrar else "")).eval()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        small = name == "tiny"
        enc, dec = call_seconds(model, batch, dtype, warmup=1 if small else 0, iters=3 if small else 1)
        row = {
            "model": name,
            "mrar": mrar,
            "batch": batch,
            "precision": precision,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "enc_s": enc,
            "dec_s": dec,
            "s_per_image": (enc + NUM_STEPS * dec) / batch,
            "e2e_s_per_image": e2e_seconds(model, batch) / batch if small and precision == "fp32" else None,
        }
        out.append(row)
        print(markdown_table([row]).splitlines()[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="add TransDiff-B at batch 64 and bf16 rows (slow on CPU)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    table = rows(quick=not args.full)
    print(f"\nseconds per image, {NUM_STEPS} sampling steps, CFG on (s_per_image extrapolated from single calls)\n")
    print(markdown_table(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

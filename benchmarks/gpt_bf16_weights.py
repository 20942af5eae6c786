"""D-AR GPT token sampling: fp32 weights, bf16 autocast over fp32 weights, and a bf16-weight copy
(`models.dar_gpt.bf16_inference_copy`, what `DARGPTModule(sample_bf16_weights=True)` samples with).

    python -m benchmarks.gpt_bf16_weights --gpt B --tokens 64 --batch 4 --threads 1
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial

import torch

from benchmarks.common import report, time_fn
from models.dar_gpt import DAR_GPT_CONFIGS, DARGPT, bf16_inference_copy, sample_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", default="B", choices=sorted(DAR_GPT_CONFIGS))
    p.add_argument("--tokens", type=int, default=64, help="sequence length (block_size); 256 for ImageNet")
    p.add_argument("--batch", type=int, default=4, help="images (CFG doubles the GPT batch)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="gpt_bf16_weights.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = DARGPT(replace(DAR_GPT_CONFIGS[a.gpt], block_size=a.tokens)).eval()
    labels = torch.arange(a.batch) % model.cfg.num_classes
    run = partial(sample_tokens, labels=labels, cfg_start=1.5, cfg_end=4.0, generator=torch.Generator())
    cases = {
        "fp32": lambda: run(model),
        "bf16 autocast": lambda: run(model, autocast_dtype=torch.bfloat16),
        "bf16 weights": partial(run, bf16_inference_copy(model)),
    }
    rows = [{"mode": k, "s_per_batch": time_fn(fn, warmup=0, iters=a.iters)} for k, fn in cases.items()]
    for r in rows:
        r["speedup_vs_autocast"] = rows[1]["s_per_batch"] / r["s_per_batch"]
    report(rows, a.json, f"D-AR GPT-{a.gpt} sampling, {a.tokens} tokens, batch {a.batch} (+CFG)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

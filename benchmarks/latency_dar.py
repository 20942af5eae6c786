"""D-AR sampling latency (seconds per image = GPT tokens + tokenizer decode), random weights.

    python benchmarks/latency_dar.py            # quick (default): a few minutes on CPU
    python benchmarks/latency_dar.py --full     # more rows, more tokens measured

The GPT cost is measured token by token. When fewer than all tokens are measured (the L rows; column
`tokens_measured`), the full-sequence time is EXTRAPOLATED (`extrapolated` = True): with the KV cache, prefill +
mean decode-step time x remaining steps; without it, a least-squares line t(p) = a + b p through the measured step
times, summed over all positions p (each recompute step costs about linearly in the prefix length). The decode is
timed on `decode_batch` images and reported per image. CFG is on (the batch is doubled), as in the paper.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import torch

from models.dar_gpt import DAR_GPT_CONFIGS, DARGPT, iter_tokens
from models.dar_tokenizer import DAR_TOKENIZER_CONFIGS, DARTokenizer


def gpt_seconds(
    gpt: DARGPT, batch: int, measure: int, use_kv_cache: bool, dtype: torch.dtype | None
) -> tuple[float, bool]:
    """Seconds to sample all block_size tokens for `batch` images (measured or extrapolated from `measure` steps)."""
    n = gpt.cfg.block_size
    labels = torch.randint(0, gpt.cfg.num_classes, (batch,))
    stream = iter_tokens(
        gpt, labels, cfg_start=1.1, cfg_end=8.0, generator=torch.Generator().manual_seed(0),
        use_kv_cache=use_kv_cache, autocast_dtype=dtype,
    )  # fmt: skip
    times = []
    start = time.perf_counter()
    for _ in range(min(measure, n)):
        next(stream)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    stream.close()
    if len(times) == n:
        return sum(times), False
    steps = torch.tensor(times, dtype=torch.float64)
    if use_kv_cache:  # prefill, then constant-cost decode steps
        return float(steps[0] + steps[1:].mean() * (n - 1)), True
    p = torch.arange(len(times), dtype=torch.float64)
    b = ((p - p.mean()) * (steps - steps.mean())).sum() / ((p - p.mean()) ** 2).sum()
    a = steps.mean() - b * p.mean()
    return float((a + b * torch.arange(n, dtype=torch.float64)).sum()), True


def decode_seconds(tok: DARTokenizer, batch: int, dtype: torch.dtype | None) -> float:
    ids = torch.randint(0, tok.cfg.codebook_size, (batch, tok.cfg.num_tokens))
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        tok.decode_tokens(ids, torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def rows(quick: bool = True, models: tuple[str, ...] = ("tiny", "L")) -> list[dict]:
    return list(iter_rows(quick, models))


def iter_rows(quick: bool = True, models: tuple[str, ...] = ("tiny", "L")) -> Iterator[dict]:
    """The rows of `rows`, one at a time (a long run shows its progress)."""
    torch.manual_seed(0)
    plans = {  # name -> (tokenizer config, batches, tokens measured with / without KV cache, decode batch)
        "tiny": ("tiny", (1, 64), (32, 32), 64),
        "L": ("v1", (1,) if quick else (1, 64), (24, 12) if quick else (64, 24), 1),
    }
    plans = {k: v for k, v in plans.items() if k in models}
    for name, (tok_name, batches, (m_cache, m_full), decode_batch) in plans.items():
        gpt = DARGPT(DAR_GPT_CONFIGS[name]).eval()
        with torch.no_grad():
            gpt.output.weight.normal_(0, 0.02)  # non-degenerate logits (the official init zeroes the head)
        tok = DARTokenizer(DAR_TOKENIZER_CONFIGS[tok_name]).eval()
        for dtype in (None, torch.bfloat16):
            dec = decode_seconds(tok, decode_batch, dtype) / decode_batch
            for batch in batches:
                for kv in (True, False):
                    measure = m_cache if kv else m_full
                    if name == "L" and batch > 1:
                        measure = max(4, measure // 4)
                    secs, extrapolated = gpt_seconds(gpt, batch, measure, kv, dtype)
                    yield (
                        {
                            "model": f"D-AR-{name}" if name != "tiny" else "tiny",
                            "batch": batch,
                            "precision": "bf16 autocast" if dtype else "fp32",
                            "kv_cache": kv,
                            "tokens": gpt.cfg.block_size,
                            "tokens_measured": min(measure, gpt.cfg.block_size),
                            "extrapolated": extrapolated,
                            "gpt_s_per_image": secs / batch,
                            "decode_s_per_image": dec,
                            "total_s_per_image": secs / batch + dec,
                        }
                    )


def row_line(r: dict) -> str:
    return "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |"


def header(r: dict) -> str:
    return "| " + " | ".join(r) + " |\n" + "|" + "---|" * len(r)


def speedups(table: list[dict]) -> str:
    out = []
    for r in table:
        if r["kv_cache"]:
            for s in table:
                same = all(s[k] == r[k] for k in ("model", "batch", "precision"))
                if same and not s["kv_cache"]:
                    ratio = s["gpt_s_per_image"] / r["gpt_s_per_image"]
                    out.append(f"{r['model']} batch {r['batch']} {r['precision']}: {ratio:.1f}x")
    return "KV-cache speed-up of the GPT part (tokens): " + "; ".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="more rows and more measured tokens (slow on CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["tiny", "L"], choices=["tiny", "L"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device: cpu, torch {torch.__version__}, {args.threads} threads")
    table = []
    for r in iter_rows(quick=not args.full, models=tuple(args.models)):
        if not table:
            print(header(r))
        print(row_line(r), flush=True)
        table.append(r)
    print("\n" + speedups(table))

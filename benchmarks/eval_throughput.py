"""Throughput of the evaluation path: Inception feature extraction, sample + extract end to end, and FID math.

    python benchmarks/eval_throughput.py [--images 32] [--batch-size 16] [--threads 2] [--bf16] [--json out.json]

Inception uses random weights with the real architecture (same cost as the real file) unless
$ARDIFF_INCEPTION_WEIGHTS or the hub cache has the real one. The end-to-end row runs the FIDCallback path
(`iter_rank_chunks` -> uint8 -> `extract_features`) with a trivial 256 px sampler, so it measures the evaluation
overhead on top of a model's own sampling time. Prints a markdown table and JSON.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.inception import build_inception, extract_features, resolve_inception_weights  # noqa: E402
from callbacks.metrics import frechet_distance, stats_from_features  # noqa: E402
from callbacks.sampling import SamplePlan, iter_rank_chunks  # noqa: E402


def inception_weights(tmp: str) -> tuple[str, str]:
    try:
        return resolve_inception_weights(None, download=False), "real"
    except FileNotFoundError:
        from ardiff.testing import make_random_inception_weights

        return make_random_inception_weights(Path(tmp) / "random_inception.pth"), "random"


def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=32, help="images per timed measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="input image size (Inception resizes to 299)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also time Inception under bf16 autocast")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        path, kind = inception_weights(tmp)
        inception = build_inception(path).to(device)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, device=device)
    extract = lambda: extract_features(inception, images, args.batch_size)
    sec = timed(extract)
    rows.append({"what": f"Inception features fp32 ({kind} weights)", "images_per_s": args.images / sec})
    if args.bf16:
        few = images[: args.batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            sec = timed(lambda: extract_features(inception, few, args.batch_size))
        rows.append({"what": "Inception features bf16 autocast", "images_per_s": few.shape[0] / sec})

    # end to end: trivial sampler (noise -> tanh) at --size, the FIDCallback chunk loop, uint8, features
    def sampler(labels: torch.Tensor, generator: torch.Generator, **_) -> torch.Tensor:
        noise = torch.randn(labels.shape[0], 3, args.size, args.size, generator=generator)
        return torch.tanh(noise.to(labels.device) + labels[:, None, None, None] / 1000)

    plan = SamplePlan(args.images, 1000, args.batch_size, seed=0)

    def sample_and_extract() -> None:
        for _, chunk in iter_rank_chunks(sampler, plan, 0, 1, device):
            extract_features(inception, chunk, args.batch_size)

    sec = timed(sample_and_extract)
    rows.append({"what": "sample (trivial sampler) + uint8 + features", "images_per_s": args.images / sec})

    # FID math on 2048-d statistics (one 2048x2048 non-symmetric eigvals, as torch-fidelity)
    feats = torch.randn(256, 2048, dtype=torch.float64)
    ref = stats_from_features(torch.randn(256, 2048, dtype=torch.float64), keep_features=False)
    start = time.perf_counter()
    frechet_distance({"mu": feats.mean(0).numpy(), "sigma": np.cov(feats.numpy(), rowvar=False)}, ref)
    rows.append({"what": "FID from features (2048-d, CPU numpy)", "seconds": time.perf_counter() - start})

    env = {
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_avg_1min": os.getloadavg()[0],
        "images": args.images,
        "batch_size": args.batch_size,
        "size": args.size,
    }
    print(f"eval throughput on {env['device']}, {args.threads} threads, load avg {env['load_avg_1min']:.1f}")
    print("| measurement | images/s | seconds |\n|---|---|---|")
    for r in rows:
        ips = f"{r['images_per_s']:.2f}" if "images_per_s" in r else ""
        sec = f"{r['seconds']:.2f}" if "seconds" in r else ""
        print(f"| {r['what']} | {ips} | {sec} |")
    result = {"env": env, "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ardiff eval`: FID / IS / precision / recall of generated images against reference statistics.

    ardiff eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--pr]      # ADM reference batch (mu/sigma, arr_0)
    ardiff eval sample_pngs/ --ref imagenet256_val.npz --format json
    ardiff eval --write-ref imagenet256_val.npz 'shards/val-{000000..000049}.tar' --image-size 256

Images come from an npz (`arr_0` uint8 NxHxWx3, as written by `ardiff sample`), a folder of PNG/JPEG files, or
WebDataset shards (a .tar file, a brace pattern, or a folder of .tar files). `--image-size` applies the ADM center
crop (as used to build the ADM reference batch) to folder/shard images; generated samples are measured as they are.
"""

import argparse
import json
import sys

import torch
from torch import Tensor

from callbacks.inception import build_inception, extract_features
from callbacks.metrics import compute_metrics, load_reference, stats_from_features
from datamodules.images import iter_images


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ardiff eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("images", help="npz (arr_0), image folder, or WebDataset shards")
    p.add_argument("--ref", help="reference statistics npz (ardiff --write-ref output, or an ADM reference batch)")
    p.add_argument("--write-ref", metavar="OUT_NPZ", help="compute reference statistics of `images` into this npz")
    p.add_argument("--no-features", action="store_true", help="--write-ref: store mu/sigma only (no precision/recall)")
    p.add_argument("--pr", action="store_true", help="also compute precision/recall (k=3)")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--image-size", type=int, help="ADM center crop of folder/shard images to this size")
    p.add_argument("--max-images", type=int, help="use only the first N images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights (.pth); else env/cache/download")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON here")
    args = p.parse_args(argv)
    if not args.ref and not args.write_ref:
        p.error("give --ref (to evaluate) or --write-ref (to make reference statistics)")
    return args


def extract_all(inception: torch.nn.Module, source: str, args: argparse.Namespace) -> dict[str, Tensor]:
    """Features of (the first --max-images) images of `source`: {'pool': (N,2048), 'logits': (N,1008)} on CPU."""
    pools, logits, seen = [], [], 0
    for batch in iter_images(source, args.batch_size, args.image_size):
        if args.max_images is not None:
            batch = batch[: args.max_images - seen]
        feats = extract_features(inception, batch, args.batch_size)
        pools.append(feats["pool"])
        logits.append(feats["logits"])
        seen += batch.shape[0]
        if args.max_images is not None and seen >= args.max_images:
            break
    if not seen:
        raise ValueError(f"{source}: no images")
    return {"pool": torch.cat(pools), "logits": torch.cat(logits)}


def format_table(metrics: dict[str, float]) -> str:
    rows = [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    inception = build_inception(args.inception_weights).to(args.device)
    feats = extract_all(inception, args.images, args)
    if args.write_ref:
        stats_from_features(feats["pool"], keep_features=not args.no_features).save(args.write_ref)
        print(f"ardiff eval: wrote reference statistics of {feats['pool'].shape[0]} images to {args.write_ref}")
        return 0
    ref = load_reference(args.ref, inception, need_features=args.pr, batch_size=args.batch_size)
    metrics = {"num_images": float(feats["pool"].shape[0])}
    metrics |= compute_metrics(feats["pool"], None if args.no_is else feats["logits"], ref, compute_pr=args.pr)
    print(json.dumps(metrics) if args.format == "json" else format_table(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

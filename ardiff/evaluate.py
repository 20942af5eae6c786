"""`ardiff eval`: FID / IS / precision / recall of generated images against reference statistics, and the judge
metrics (class accuracy, judge FD) with a timm classifier judge.

    ardiff eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--pr]      # ADM reference batch (mu/sigma, arr_0)
    ardiff eval sample_pngs/ --ref imagenet256_val.npz --format json
    ardiff eval --write-ref imagenet256_val.npz 'shards/val-{000000..000049}.tar' --image-size 256
    ardiff eval samples.npz --judge data/x/shards/train/judge_resnet10t_32.pt --judge-ref data/x/shards/val
    ardiff eval samples.npz --judge resnet50.safetensors --judge-arch resnet50.a1_in1k --judge-ref val_judge.npz

The judge (an `ardiff judge train` file, or timm weights with --judge-arch) gives `class_acc` (the fraction of
images it assigns to their label: `labels` of an `ardiff sample` npz, or the `cls` of shards) and `fd_judge` (the
Frechet distance of its pre-logits features to --judge-ref: images, or an npz written by --write-judge-ref).

Images come from an npz (`arr_0` uint8 NxHxWx3, as written by `ardiff sample`), a folder of PNG/JPEG files, or
WebDataset shards (a .tar file, a brace pattern, or a folder of .tar files). `--image-size` applies the ADM center
crop (as used to build the ADM reference batch) to folder/shard images; generated samples are measured as they are.
"""

import argparse
import json
import sys

import numpy as np
import torch
from torch import Tensor

from callbacks.inception import build_inception, extract_features
from callbacks.judge import Judge, judge_statistics, load_judge, load_statistics, save_statistics
from callbacks.metrics import FeatureMoments, compute_metrics, frechet_distance, load_reference, stats_from_features
from datamodules.images import is_shards, iter_images, iter_labeled_images


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
    p.add_argument("--judge", help="judge classifier: an `ardiff judge train` file, or timm weights (+ --judge-arch)")
    p.add_argument("--judge-arch", help="timm architecture of --judge weights (e.g. resnet50.a1_in1k)")
    p.add_argument("--judge-ref", help="judge reference: images (shards, folder, npz) or a --write-judge-ref npz")
    p.add_argument("--write-judge-ref", metavar="OUT_NPZ", help="write judge feature statistics of `images` here")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights (.pth); else env/cache/download")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON here")
    args = p.parse_args(argv)
    if not args.ref and not args.write_ref and not args.judge:
        p.error("give --ref (to evaluate), --write-ref (to make reference statistics) or --judge")
    if args.write_judge_ref and not args.judge:
        p.error("--write-judge-ref needs --judge")
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


def _npz_keys(path: str) -> set[str]:
    with np.load(path) as npz:
        return set(npz.files)


def _has_labels(source: str) -> bool:
    return "labels" in _npz_keys(source) if source.endswith(".npz") else is_shards(source)


def judge_metrics(judge: Judge, args: argparse.Namespace) -> dict[str, float]:
    """class_acc (when the images have labels) and fd_judge (with --judge-ref) of (the first --max-images) images."""
    labeled = _has_labels(args.images)
    batches = (
        iter_labeled_images(args.images, args.batch_size, args.image_size)
        if labeled
        else ((x, None) for x in iter_images(args.images, args.batch_size, args.image_size))
    )
    moments = FeatureMoments(judge.num_features, sync_on_compute=False)
    correct, seen = 0, 0
    for images, labels in batches:
        if args.max_images is not None:
            images = images[: args.max_images - seen]
        logits, features = judge(images, args.batch_size)
        moments.update(features.cpu())
        if labels is not None:
            correct += int((logits.argmax(1).cpu() == labels[: len(images)]).sum())
        seen += len(images)
        if args.max_images is not None and seen >= args.max_images:
            break
    if args.write_judge_ref:
        save_statistics(args.write_judge_ref, moments.compute(), args.images)
        print(f"ardiff eval: wrote judge statistics of {seen} images to {args.write_judge_ref}")
        return {}
    metrics = {"num_images": float(seen)}
    if labeled:
        metrics["class_acc"] = correct / seen
    else:
        print(f"ardiff eval: {args.images} has no labels: class_acc skipped", file=sys.stderr)
    if args.judge_ref:
        if args.judge_ref.endswith(".npz") and _npz_keys(args.judge_ref) & {"judge_mu"}:
            ref = load_statistics(args.judge_ref)
        else:
            ref = judge_statistics(judge, args.judge_ref, args.image_size, args.batch_size)
        metrics["fd_judge"] = frechet_distance(moments.compute(), ref)
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    rows = [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    metrics: dict[str, float] = {}
    if args.judge:
        metrics |= judge_metrics(load_judge(args.judge, args.judge_arch).to(args.device), args)
        if args.write_judge_ref:
            return 0
    if args.ref or args.write_ref:
        inception = build_inception(args.inception_weights).to(args.device)
        feats = extract_all(inception, args.images, args)
        if args.write_ref:
            stats_from_features(feats["pool"], keep_features=not args.no_features).save(args.write_ref)
            print(f"ardiff eval: wrote reference statistics of {feats['pool'].shape[0]} images to {args.write_ref}")
            return 0
        ref = load_reference(args.ref, inception, need_features=args.pr, batch_size=args.batch_size)
        metrics["num_images"] = float(feats["pool"].shape[0])
        metrics |= compute_metrics(feats["pool"], None if args.no_is else feats["logits"], ref, compute_pr=args.pr)
    print(json.dumps(metrics) if args.format == "json" else format_table(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

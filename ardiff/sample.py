"""`ardiff sample`: generate N class-balanced images from a checkpoint into an ADM-format npz and/or a PNG folder.

    ardiff sample --module lightning_modules.transdiff.TransDiffModule --ckpt last.ckpt --out samples.npz
    ardiff sample --preset transdiff_large --ckpt checkpoint-last.pth --vae kl16.ckpt --out samples.npz  (released)
    torchrun --nproc_per_node 8 -m ardiff.sample --config run.yaml --ckpt last.ckpt --out s.npz --set cfg_scale=1.5

The sample set is the `SamplePlan` of callbacks/sampling.py (labels `i * C // N`, chunk k seeded `seed + k`), so the
same command gives the same images on any number of ranks. Each finished chunk is written to `--chunk-dir`
(atomically); a restarted job skips finished chunks. When all chunks exist, rank 0 assembles `arr_0` (N,H,W,3)
uint8 and `labels` (N,) in index order, as the ADM evaluation suite expects.
"""

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from tqdm import tqdm

from ardiff.official import PRESETS, load_official
from callbacks.sampling import SamplePlan, eval_mode, generate_chunk
from models.checkpoint import check_checkpoint_file, safe_torch_load

EXIT_INCOMPLETE = 3  # --max-chunks stopped the job before every chunk existed; rerun the same command to resume


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ardiff sample", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--module", help="LightningModule class path (hyper-parameters are read from the checkpoint)")
    src.add_argument(
        "--config", help="LightningCLI YAML; its `model:` section (class_path/init_args) builds the module"
    )
    src.add_argument(
        "--preset",
        help="released weights with the official evaluation settings (ardiff/official.py): " + ", ".join(PRESETS),
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="Lightning checkpoint (.ckpt file, or an FSDP2 checkpoint folder); with --preset the official file",
    )
    p.add_argument("--vae", help="--preset transdiff_*: MAR's KL-16 VAE weights (kl16.ckpt)")
    p.add_argument("--tokenizer", help="--preset dar_*: the D-AR tokenizer file (D-AR-tokenizer_v1.pt)")
    p.add_argument("--out", help="ADM-format npz to write (arr_0 uint8 NxHxWx3, labels)")
    p.add_argument("--png-dir", help="also (or only) write <index:06d>.png files here")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--chunk-size", type=int, default=64, help="images per sample_images call (part of the sample set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, help="default: the module's num_classes")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="sample_images override (YAML value)"
    )
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype for sampling")
    p.add_argument("--chunk-dir", help="where finished chunks are kept (default: <out or png-dir>.chunks)")
    p.add_argument("--keep-chunks", action="store_true", help="keep the chunk dir after assembling the npz")
    p.add_argument("--max-chunks", type=int, help="generate at most this many chunks per rank, then exit (resumable)")
    args = p.parse_args(argv)
    if not args.out and not args.png_dir:
        p.error("give --out and/or --png-dir")
    return args


def parse_overrides(items: list[str]) -> dict:
    """['cfg=1.5', 'steps=100'] -> {'cfg': 1.5, 'steps': 100} (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"ardiff sample: --set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_module(module: str | None, config: str | None, ckpt: str) -> L.LightningModule:
    """Build the LightningModule from its class path (hparams from the checkpoint) or a LightningCLI config.
    `ckpt` may be a distributed (FSDP2) checkpoint folder: it is vetted and consolidated in memory."""
    check_checkpoint_file(ckpt)  # missing / truncated / unsafe: a clear error naming the file
    if os.path.isdir(ckpt):
        from ardiff.convert import consolidate

        full = consolidate(ckpt)
        if module is not None:
            pl_module = import_class(module)(**full.get("hyper_parameters", {}))
            pl_module.load_state_dict(full["state_dict"])
            return pl_module
    if module is not None:
        return import_class(module).load_from_checkpoint(ckpt, map_location="cpu")
    from jsonargparse import ArgumentParser

    from ardiff.cli import recipe_model_section

    model_cfg = recipe_model_section(config)  # includes merged, ${...} resolved
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningModule, "model", required=True)
    pl_module = parser.instantiate_classes(parser.parse_object({"model": model_cfg})).model
    pl_module.load_state_dict((full if os.path.isdir(ckpt) else safe_torch_load(ckpt))["state_dict"])
    return pl_module


def chunk_path(chunk_dir: str, k: int) -> str:
    return os.path.join(chunk_dir, f"chunk_{k:06d}.npz")


def check_plan_file(chunk_dir: str, record: dict, is_zero: bool) -> None:
    """Refuse to resume into a chunk dir made for a different sample set (call on every rank, then barrier)."""
    path = os.path.join(chunk_dir, "plan.json")
    if is_zero and not os.path.exists(path):
        os.makedirs(chunk_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
    _barrier()
    with open(path) as f:
        found = json.load(f)
    if found != record:
        raise SystemExit(
            f"ardiff sample: {chunk_dir} holds chunks of another run ({found} != {record}); "
            "use another --chunk-dir or delete it"
        )


def write_chunk(chunk_dir: str, png_dir: str | None, k: int, plan: SamplePlan, images: torch.Tensor) -> None:
    """Write chunk k (uint8 (n,3,H,W)): PNGs first, then the chunk npz atomically (its existence marks it done)."""
    indices = plan.chunk_indices(k)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
    if png_dir:
        for i, img in zip(indices.tolist(), arr, strict=True):
            Image.fromarray(img).save(os.path.join(png_dir, f"{i:06d}.png"))
    tmp = chunk_path(chunk_dir, k) + ".tmp.npz"
    np.savez(tmp, images=arr, labels=plan.labels(indices).numpy(), indices=indices.numpy())
    os.replace(tmp, chunk_path(chunk_dir, k))


def assemble_npz(chunk_dir: str, plan: SamplePlan, out: str) -> None:
    """All chunks -> `out` with arr_0 (N,H,W,3) uint8 and labels (N,) in index order."""
    arr = labels = None
    for k in range(plan.num_chunks):
        with np.load(chunk_path(chunk_dir, k)) as chunk:
            images, idx = chunk["images"], chunk["indices"]
            if arr is None:
                arr = np.empty((plan.num_samples, *images.shape[1:]), dtype=np.uint8)
                labels = np.empty(plan.num_samples, dtype=np.int64)
            arr[idx], labels[idx] = images, chunk["labels"]
    tmp = out + ".tmp.npz"
    np.savez(tmp, arr_0=arr, labels=labels)
    os.replace(tmp, out)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _run(args, rank, world_size, device)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> int:
    overrides = parse_overrides(args.set)
    if args.preset:
        pl_module = load_official(args.preset, args.ckpt, args.tokenizer, args.vae).to(device)
    else:
        pl_module = load_module(args.module, args.config, args.ckpt).to(device)
    plan = SamplePlan(args.num_samples, args.num_classes or pl_module.num_classes, args.chunk_size, args.seed)
    chunk_dir = args.chunk_dir or (args.out or args.png_dir.rstrip("/")) + ".chunks"
    record = {"plan": dataclasses.asdict(plan), "overrides": overrides, "ckpt": os.path.abspath(args.ckpt)}
    if args.preset:
        record["preset"] = args.preset
    check_plan_file(chunk_dir, record, rank == 0)
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)

    todo = [k for k in plan.rank_chunks(rank, world_size) if not os.path.exists(chunk_path(chunk_dir, k))]
    if args.max_chunks is not None:
        todo = todo[: args.max_chunks]
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    amp = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    bar = tqdm(todo, desc=f"sampling (rank 0 of {world_size})", unit="chunk", disable=rank != 0)
    with eval_mode(pl_module), amp:
        for k in bar:
            images = generate_chunk(pl_module.sample_images, plan, k, device, **overrides)  # (n, 3, H, W) uint8
            write_chunk(chunk_dir, args.png_dir, k, plan, images)
    _barrier()

    missing = [k for k in range(plan.num_chunks) if not os.path.exists(chunk_path(chunk_dir, k))]
    if missing:
        if rank == 0:
            print(
                f"ardiff sample: {plan.num_chunks - len(missing)}/{plan.num_chunks} chunks done in {chunk_dir}; "
                "rerun the same command to continue",
                file=sys.stderr,
            )
        return EXIT_INCOMPLETE
    if rank == 0:
        if args.out:
            assemble_npz(chunk_dir, plan, args.out)
            print(f"ardiff sample: wrote {args.out} ({plan.num_samples} images)")
        if not args.keep_chunks:
            for k in range(plan.num_chunks):
                os.remove(chunk_path(chunk_dir, k))
            os.remove(os.path.join(chunk_dir, "plan.json"))
            with contextlib.suppress(OSError):  # keep the dir if someone put other files there
                os.rmdir(chunk_dir)
    _barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Feature caches: image shards -> shards of encoder outputs for the image and its horizontal flip.

One output shard per input shard (same name, same keys) with `<field>.npy`, `<field>_flip.npy` and `cls`, plus
`cache_info.json` (encoder, scale, image size). Images get the ADM center crop and no random flip (MAR's recipe).
Finished shards are skipped on a rerun. Work is split over torchrun ranks (RANK/WORLD_SIZE) and, within a rank,
over `procs` forked processes (CPU).

    torchrun --nproc-per-node 8 -m ardiff_cli data cache-latents "train-{000000..001281}.tar" cache/ --vae kl16.ckpt
    ardiff data cache-tokens "train-{000000..001281}.tar" tokens/ --tokenizer dar_tokenizer.pt
"""

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import re
from collections.abc import Callable

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from datamodules.transforms import center_crop_arr, decode_image, image_bytes, to_tensor
from datamodules.webdataset import expand_shards

log = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]  # (B, 3, H, W) in [-1, 1] -> (B, ...)


def shard_name(url: str) -> str:
    """Output file name for an input shard path or URL (`pipe:... s3://b/train-000001.tar -` -> train-000001.tar)."""
    names = re.findall(r"[^/\s]+\.tar\b", url)
    if not names:
        raise ValueError(f"cannot find a *.tar shard name in {url!r}")
    return names[-1]


def _skip_and_warn(exn: Exception) -> bool:
    log.warning("skipping bad sample or shard: %s: %s", type(exn).__name__, exn)
    return True


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def cache_shard(url: str, out_path: str, encode: EncodeFn, field: str, image_size: int, batch_size: int) -> int:
    """Encode every image of one shard (and its flip) into `out_path` (via `.tmp` + rename). Returns #samples."""
    tmp = out_path + ".tmp"
    written = 0
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, compress=False, mtime=0) as sink:

        def flush(keys: list[str], labels: list[int], images: list[torch.Tensor]) -> None:
            x = torch.stack(images)  # (B, 3, H, W)
            with torch.no_grad():
                feats, feats_flip = encode(x), encode(x.flip(-1))
            feats, feats_flip = np.asarray(torch.as_tensor(feats).cpu()), np.asarray(torch.as_tensor(feats_flip).cpu())
            for i, key in enumerate(keys):
                sink.write({"__key__": key, f"{field}.npy": _npy(feats[i]), f"{field}_flip.npy": _npy(feats_flip[i]),
                            "cls": str(labels[i]).encode()})  # fmt: skip

        keys, labels, images = [], [], []
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=_skip_and_warn):
            try:
                img = center_crop_arr(decode_image(image_bytes(sample)), image_size)
                label = int(sample["cls"])
            except Exception as exn:
                _skip_and_warn(exn)
                continue
            keys.append(sample["__key__"])
            labels.append(label)
            images.append(to_tensor(img))
            if len(images) == batch_size:
                flush(keys, labels, images)
                written += len(keys)
                keys, labels, images = [], [], []
        if images:
            flush(keys, labels, images)
            written += len(keys)
    if written == 0:  # unreadable input: leave no output, so a rerun retries this shard
        os.remove(tmp)
        log.warning("no samples read from %s; %s not written", url, out_path)
        return 0
    os.replace(tmp, out_path)
    return written


def _cache_shards(jobs: list[tuple[str, str]], encode: EncodeFn, field: str, image_size: int, batch_size: int,
                  progress: bool, desc: str) -> int:  # fmt: skip
    total = 0
    for url, out_path in tqdm(jobs, desc=desc, unit="shard", disable=not progress):
        total += cache_shard(url, out_path, encode, field, image_size, batch_size)
    return total


def run_feature_cache(
    input_shards: str | list[str],
    output_dir: str,
    encode: EncodeFn,
    field: str,
    image_size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    info: dict | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    procs: int = 1,
    progress: bool = True,
) -> int:
    """Cache `encode(images)` for every shard of `input_shards` into `output_dir`; see the module doc.

    `encode` gets (B, 3, image_size, image_size) float32 in [-1, 1] on `device` and returns a per-sample array batch.
    `rank`/`world_size` default to the torchrun env; `procs > 1` forks that many processes for this rank (CPU).
    Returns the number of samples written by this process (0 for shards that were already done).
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    urls = expand_shards(input_shards)
    os.makedirs(output_dir, exist_ok=True)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (output shards reuse them)")
    if rank == 0:
        meta = {"field": field, "image_size": image_size, "flip": True, "num_shards": len(urls), **(info or {})}
        with open(os.path.join(output_dir, "cache_info.json"), "w") as f:
            json.dump(meta, f, indent=1)

    jobs = [(u, os.path.join(output_dir, n)) for u, n in zip(urls, names, strict=True)][rank::world_size]
    todo = [(u, p) for u, p in jobs if not os.path.exists(p)]
    if len(todo) < len(jobs):
        log.info("rank %d: %d of %d shards already cached", rank, len(jobs) - len(todo), len(jobs))

    def on_device(x: torch.Tensor):
        return encode(x.to(device, non_blocking=True))

    desc = f"cache {field} (rank {rank})"
    if procs <= 1 or len(todo) <= 1:
        return _cache_shards(todo, on_device, field, image_size, batch_size, progress, desc)
    ctx = mp.get_context("fork")  # children inherit `encode` (a model closure) without pickling it
    threads = max(1, torch.get_num_threads() // procs)

    def child(part: list[tuple[str, str]], show: bool) -> None:
        torch.set_num_threads(threads)
        _cache_shards(part, on_device, field, image_size, batch_size, show, desc)

    children = [ctx.Process(target=child, args=(todo[i::procs], progress and i == 0)) for i in range(procs)]
    for c in children:
        c.start()
    for c in children:
        c.join()
    failed = [c.exitcode for c in children if c.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} cache processes failed (exit codes {failed}); rerun to resume")
    return sum(_count_samples(p) for _, p in todo if os.path.exists(p))


def _count_samples(path: str) -> int:
    return sum(1 for s in wds.tariterators.tarfile_samples([{"url": path}]) if "cls" in s)


def _cache_args(prog: str, model_flag: str, model_help: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="image shards: path, folder, brace pattern or URL")
    p.add_argument("out", help="output folder for the cache shards")
    p.add_argument(model_flag, dest="model", required=True, help=model_help)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--procs", type=int, default=1, help="processes per rank (CPU)")
    args = p.parse_args(argv)
    if args.device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return args


def main_cache_latents(argv: list[str] | None = None) -> int:
    """`ardiff data cache-latents`: KL-16 VAE posterior moments (mean ‖ logvar) for image and flip."""
    from models.vae import load_kl16

    args = _cache_args("ardiff data cache-latents", "--vae", "KL-16 VAE checkpoint (MAR/LDM keys)", argv)
    vae = load_kl16(args.model).to(args.device).eval()
    n = run_feature_cache(
        args.shards, args.out, lambda x: vae.encode_moments(x).float(), "moments", args.image_size,
        args.batch_size, args.device, procs=args.procs,
        info={"encoder": "kl16", "checkpoint": os.path.abspath(args.model), "scale_factor": vae.scale_factor},
    )  # fmt: skip
    print(f"cached moments of {n} images -> {args.out}")
    return 0


def main_cache_tokens(argv: list[str] | None = None) -> int:
    """`ardiff data cache-tokens`: D-AR tokenizer token ids for image and flip."""
    from lightning_modules.dar import load_tokenizer_checkpoint

    args = _cache_args("ardiff data cache-tokens", "--tokenizer", "D-AR tokenizer checkpoint", argv)
    tok = load_tokenizer_checkpoint(args.model).to(args.device).eval()
    n = run_feature_cache(
        args.shards, args.out, lambda x: tok.encode_tokens(x).long(), "tokens", args.image_size,
        args.batch_size, args.device, procs=args.procs,
        info={"encoder": "dar_tokenizer", "checkpoint": os.path.abspath(args.model)},
    )  # fmt: skip
    print(f"cached tokens of {n} images -> {args.out}")
    return 0

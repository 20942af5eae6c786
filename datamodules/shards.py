"""Write an image folder (ImageNet layout or any ImageFolder) to WebDataset tar shards.

Output (`OUT/`): `{prefix}-000000.tar ...` (the names `wds.ShardWriter("{prefix}-%06d.tar")` would give), each
sample `{key}.jpg|png` (image bytes), `{key}.cls` (class index) and optionally `{key}.json` (relative path, wnid);
`class_index.json` (wnid -> index, sorted wnids = the official ImageNet order); `{prefix}-info.json` (per-shard
sample counts, skipped files); `{prefix}-plan.json` (fingerprint of the sample->shard plan, checked on reruns).

The plan is fixed up front (sorted files, seeded shuffle, then cut by count/size), every shard is written to
`.tmp` and renamed, and finished shards are skipped on a rerun, so an interrupted run can simply be restarted.
Unreadable images are skipped with a warning and listed in the summary.

    ardiff data write-shards /data/imagenet/train /data/shards/train
    ardiff data write-shards /data/imagenet/val /data/shards/val --val-labels val_labels.txt \
        --class-index /data/shards/train/class_index.json
"""

import argparse
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> shard field
TAR_OVERHEAD = 3 * 1024  # tar headers + padding of the 3 members of one sample, for --maxsize planning


@dataclass(frozen=True)
class SourceImage:
    path: str
    relpath: str  # relative to the source folder (stored in the json metadata)
    label: int
    key: str
    wnid: str


@dataclass
class ShardSummary:
    out_dir: str
    shards: list[str]  # shard file names, in order
    num_samples: int  # samples in all shards
    num_written: int  # shards written by this run (the rest existed already)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


# ---------------------------------------------------------------------------------------------------------------------
# Scanning the source
# ---------------------------------------------------------------------------------------------------------------------


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _sanitize_key(s: str) -> str:
    """WebDataset splits member names at the first dot and treats keys starting with `_` as metadata."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", s)
    return "k" + key if key.startswith("_") else key


def _with_keys(entries: list[tuple[Path, Path, int, str]]) -> list[SourceImage]:
    """(path, relpath, label, wnid) -> SourceImage with file-stem keys, or relative-path keys if stems collide."""
    stems = [_sanitize_key(rel.stem) for _, rel, _, _ in entries]
    if len(set(stems)) != len(stems):
        stems = [_sanitize_key(str(rel.with_suffix(""))) for _, rel, _, _ in entries]
        if len(set(stems)) != len(stems):
            raise ValueError("sample keys are not unique after replacing dots/slashes; rename the source files")
    return [
        SourceImage(str(p), str(rel), label, key, wnid)
        for (p, rel, label, wnid), key in zip(entries, stems, strict=True)
    ]


def scan_image_folder(src: str | Path, class_index: dict[str, int] | None = None) -> list[SourceImage]:
    """`src/<class>/*.<img>` (ImageNet train layout). Class indices follow the sorted class-folder names
    unless `class_index` is given."""
    src = Path(src)
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"no class folders in {src} (expected {src}/<class>/<image files>)")
    if class_index is None:
        class_index = {d.name: i for i, d in enumerate(class_dirs)}
    entries = []
    for d in class_dirs:
        if d.name not in class_index:
            raise KeyError(f"class folder {d.name!r} is not in the class index")
        for p in sorted(d.rglob("*")):
            if _is_image(p):
                entries.append((p, p.relative_to(src), class_index[d.name], d.name))
    return _with_keys(entries)


def read_labels_file(labels_file: str | Path) -> dict[str, str]:
    """`filename label` per line (label = wnid or integer index; whitespace- or comma-separated; the filename may
    omit its extension; a header line such as ImageNet's LOC_val_solution.csv is skipped) -> {stem: label}."""
    labels = {}
    for line in Path(labels_file).read_text().splitlines():
        parts = [t for t in re.split(r"[,\s]+", line.strip()) if t]
        if len(parts) < 2 or parts[0].lower() in ("imageid", "filename", "file"):
            continue
        labels[Path(parts[0]).stem] = parts[1]
    if not labels:
        raise ValueError(f"no `filename label` lines in {labels_file}")
    return labels


def scan_flat_folder(
    src: str | Path, labels_file: str | Path, class_index: dict[str, int] | None = None
) -> list[SourceImage]:
    """Flat `src/*.<img>` (ImageNet val layout) labelled by a labels file. Wnid labels are mapped with `class_index`
    (pass the train set's `class_index.json`; by default the sorted wnids of the labels file)."""
    src = Path(src)
    labels = read_labels_file(labels_file)
    numeric = all(v.isdigit() for v in labels.values())
    if not numeric and class_index is None:
        class_index = {w: i for i, w in enumerate(sorted(set(labels.values())))}
    entries = []
    for p in sorted(src.iterdir()):
        if not _is_image(p):
            continue
        if p.stem not in labels:
            raise KeyError(f"{p.name} has no entry in the labels file {labels_file}")
        lab = labels[p.stem]
        label = int(lab) if numeric else class_index[lab]
        entries.append((p, p.relative_to(src), label, "" if numeric else lab))
    if not entries:
        raise FileNotFoundError(f"no images in {src}")
    return _with_keys(entries)


# ---------------------------------------------------------------------------------------------------------------------
# Planning and writing
# ---------------------------------------------------------------------------------------------------------------------


def plan_shards(
    items: list[SourceImage], maxcount: int, maxsize: int | None = None, shuffle: bool = True, seed: int = 0
) -> list[list[SourceImage]]:
    """Deterministic sample->shard assignment: seeded shuffle, then cut whenever `maxcount` samples or `maxsize`
    bytes (source file sizes plus tar overhead; exact for passthrough, an estimate when re-encoding) are reached."""
    items = list(items)
    if shuffle:
        random.Random(seed).shuffle(items)
    shards, current, size = [], [], 0
    for item in items:
        nbytes = os.path.getsize(item.path) + TAR_OVERHEAD if maxsize else 0
        if current and (len(current) >= maxcount or (maxsize and size + nbytes > maxsize)):
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def encode_source_image(path: str, reencode: bool, quality: int) -> tuple[str, bytes]:
    """Read and fully decode one image (raises if it is unreadable) -> (shard field, bytes). Passthrough keeps the
    original bytes of JPEG/PNG/WebP files; everything else (and `reencode=True`) becomes a JPEG of `quality`."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        fmt = img.format
        if not reencode and fmt in PASSTHROUGH_FORMATS:
            return PASSTHROUGH_FORMATS[fmt], raw
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "jpg", buf.getvalue()


@dataclass(frozen=True)
class _ShardTask:
    path: str
    items: list[SourceImage]
    reencode: bool
    quality: int
    with_json: bool


def _write_shard(task: _ShardTask) -> tuple[str, int, list[tuple[str, str]]]:
    """Write one shard to `.tmp` and rename it. Returns (path, samples written, skipped (path, reason))."""
    tmp = task.path + ".tmp"
    written, skipped = 0, []
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, compress=False, mtime=0) as sink:
        for item in task.items:
            try:
                ext, data = encode_source_image(item.path, task.reencode, task.quality)
            except Exception as err:  # unreadable / truncated / not an image: skip, never abort
                skipped.append((item.path, f"{type(err).__name__}: {err}"))
                continue
            sample = {"__key__": item.key, ext: data, "cls": str(item.label).encode()}
            if task.with_json:
                sample["json"] = json.dumps({"path": item.relpath, "wnid": item.wnid, "label": item.label}).encode()
            sink.write(sample)
            written += 1
    os.replace(tmp, task.path)
    return task.path, written, skipped


def _existing_shard(task: _ShardTask) -> tuple[str, int, list[tuple[str, str]]]:
    """Count the samples of a shard finished by an earlier run; planned samples it lacks were skipped then."""
    with tarfile.open(task.path) as tar:
        keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".cls")}
    skipped = [(it.path, "skipped by an earlier run") for it in task.items if it.key not in keys]
    return task.path, len(keys), skipped


def _plan_fingerprint(shards: list[list[SourceImage]], reencode: bool, quality: int, with_json: bool) -> dict:
    h = hashlib.sha1()
    for shard in shards:
        h.update(("|".join(f"{it.key}:{it.label}" for it in shard) + "\n").encode())
    return {
        "num_shards": len(shards),
        "num_planned": sum(len(s) for s in shards),
        "digest": h.hexdigest(),
        "reencode": reencode,
        "quality": quality,
        "json": with_json,
    }


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    val_labels: str | Path | None = None,
    class_index: str | Path | dict[str, int] | None = None,
    prefix: str | None = None,
    maxcount: int = 1000,
    maxsize: int | None = None,
    reencode: bool = False,
    quality: int = 95,
    shuffle: bool = True,
    seed: int = 0,
    with_json: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> ShardSummary:
    """Write `src` (ImageFolder, or flat folder + `val_labels`) to WebDataset shards in `out`; see the module doc.
    `workers=None` uses all cores; 0 or 1 writes in this process."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or src.name
    if isinstance(class_index, (str, Path)):
        class_index = json.loads(Path(class_index).read_text())
    if val_labels is not None:
        items = scan_flat_folder(src, val_labels, class_index)
    else:
        items = scan_image_folder(src, class_index)
    index = class_index or {it.wnid: it.label for it in items if it.wnid}
    if index:
        (out / "class_index.json").write_text(json.dumps(dict(sorted(index.items(), key=lambda kv: kv[1])), indent=0))

    shards = plan_shards(items, maxcount, maxsize, shuffle, seed)
    fingerprint = _plan_fingerprint(shards, reencode, quality, with_json)
    plan_file = out / f"{prefix}-plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != fingerprint:
        raise RuntimeError(
            f"{plan_file} describes a different shard plan (other source files or options); "
            f"write to a fresh output folder or delete {out}/{prefix}-* first"
        )
    plan_file.write_text(json.dumps(fingerprint, indent=1))

    tasks = [
        _ShardTask(str(out / f"{prefix}-{i:06d}.tar"), shard, reencode, quality, with_json)
        for i, shard in enumerate(shards)
    ]
    todo = [t for t in tasks if not os.path.exists(t.path)]
    results = {t.path: _existing_shard(t) for t in tasks if os.path.exists(t.path)}
    if len(results):
        log.info("%d of %d shards already exist in %s; writing the other %d", len(results), len(tasks), out, len(todo))

    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(tasks), initial=len(results), desc=f"shards {prefix}", unit="shard", disable=not progress)
    if workers > 1 and len(todo) > 1:
        with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:  # workers only need PIL + tar
            done = pool.imap_unordered(_write_shard, todo)
            for path, n, skipped in done:
                results[path] = (path, n, skipped)
                bar.update()
    else:
        for task in todo:
            results[task.path] = _write_shard(task)
            bar.update()
    bar.close()

    skipped = [s for t in tasks for s in results[t.path][2]]
    for path, reason in skipped:
        log.warning("skipped unreadable image %s (%s)", path, reason)
    info = {
        "source": str(src),
        "num_samples": sum(results[t.path][1] for t in tasks),
        "shards": [{"name": os.path.basename(t.path), "nsamples": results[t.path][1]} for t in tasks],
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    (out / f"{prefix}-info.json").write_text(json.dumps(info, indent=1))
    return ShardSummary(
        out_dir=str(out),
        shards=[os.path.basename(t.path) for t in tasks],
        num_samples=info["num_samples"],
        num_written=len(todo),
        skipped=skipped,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ardiff data write-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ImageFolder (src/<class>/*.JPEG) or flat val folder (with --val-labels)")
    p.add_argument("out", help="output folder for the shards")
    p.add_argument("--val-labels", help="labels file for a flat folder: lines `filename wnid` or `filename index`")
    p.add_argument("--class-index", help="class_index.json (wnid -> index) to reuse, e.g. the train set's")
    p.add_argument("--prefix", help="shard name prefix (default: the source folder name)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--maxsize", type=int, default=None, help="bytes per shard (planned from source file sizes)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reencode", dest="reencode", action="store_true", help="re-encode every image as JPEG")
    g.add_argument("--passthrough", dest="reencode", action="store_false", help="keep original bytes (default)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for --reencode")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep sorted order in the shards")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("--no-json", dest="with_json", action="store_false", help="omit the per-sample json metadata")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = write_shards(
        args.src,
        args.out,
        val_labels=args.val_labels,
        class_index=args.class_index,
        prefix=args.prefix,
        maxcount=args.maxcount,
        maxsize=args.maxsize,
        reencode=args.reencode,
        quality=args.quality,
        shuffle=args.shuffle,
        seed=args.seed,
        with_json=args.with_json,
        workers=args.workers,
    )
    print(
        f"{len(summary.shards)} shards ({summary.num_written} written now), {summary.num_samples} samples, "
        f"{summary.num_skipped} unreadable images skipped -> {summary.out_dir}"
    )
    return 0

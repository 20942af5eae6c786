"""WebDataset shards -> `LightningDataModule` with exact DDP/worker splitting and a resumable data position.

Shards are given as local paths, folders (all `*.tar` inside), brace patterns (`train-{000000..001281}.tar`), lists,
or URLs webdataset opens (`pipe:aws s3 cp s3://bucket/train-000000.tar -`, `https://...`).

Train epoch, `resampled=False`: the shard list is shuffled with `(seed, epoch)` (identical on every rank), cut to a
multiple of the world size, and split `rank::world`, then `worker::num_workers`; each worker streams its shards
through a seeded shuffle buffer and yields whole batches, so every sample is read exactly once per epoch.
Train epoch, `resampled=True`: every (rank, worker) draws shards with replacement from its own seeded RNG forever and
the loader stops after `epoch_length` batches, so every rank runs the same number of steps.

The train loader (`ShardLoader`) implements `state_dict()/load_state_dict()`; Lightning stores it in checkpoints and a
resumed run continues the epoch where it stopped: the pipeline is deterministic per (seed, epoch, rank, worker), so
each worker replays its stream up to the batches already consumed without decoding them.
Corrupt samples or shards are skipped with a warning (no sleep) and counted in `num_skipped`.
"""

import hashlib
import io
import itertools
import logging
import os
import random
from collections.abc import Iterator
from glob import glob
from typing import Literal

import braceexpand
import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from datamodules.transforms import center_crop_arr, decode_image, image_bytes, to_tensor

log = logging.getLogger(__name__)

Kind = Literal["image", "latent", "tokens"]
CACHE_FIELDS = {"latent": "moments", "tokens": "tokens"}  # kind -> `<field>.npy` / `<field>_flip.npy` in the shards


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def expand_shards(spec: str | list[str] | None) -> list[str]:
    """Shard spec(s) -> flat list of shard paths/URLs. Raises FileNotFoundError naming the pattern when local
    shards are missing."""
    if spec is None:
        return []
    urls = []
    for s in [spec] if isinstance(spec, str) else list(spec):
        if not _is_url(s) and os.path.isdir(s):
            found = sorted(glob(os.path.join(s, "*.tar")))
            if not found:
                raise FileNotFoundError(f"shard folder {s!r} contains no *.tar files")
            urls += found
            continue
        expanded = list(braceexpand.braceexpand(s))
        missing = [u for u in expanded if not _is_url(u) and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"shard pattern {s!r}: {len(missing)} of {len(expanded)} shard files do not exist "
                f"(first: {missing[0]!r}); write shards with `ardiff data write-shards` or fix the path"
            )
        urls += expanded
    return urls


def _coin(seed: int, epoch: int, key: str) -> bool:
    """Deterministic fair coin per (seed, epoch, sample key): the flip does not depend on worker or resume."""
    return hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=1).digest()[0] & 1 == 1


def group_by_class(samples: Iterator[dict], n: int) -> Iterator[list[dict]]:
    """Groups of `n` distinct (still encoded) samples of one class, in stream order: each sample waits in its class's
    bin until the bin holds `n` (MRAR's training unit: 4 real images of the same class). Leftovers are dropped at the
    end of the stream; the bins hold encoded bytes, so waiting costs little memory."""
    bins: dict[int, list[dict]] = {}
    for sample in samples:
        b = bins.setdefault(int(sample["cls"]), [])
        b.append(sample)
        if len(b) == n:
            yield b
            bins[int(sample["cls"])] = []


class ShardStream(IterableDataset):
    """Batches of decoded samples from the shards of one rank; each DataLoader worker reads its own shards.

    `position` and `skips` are shared-memory tensors, so the epoch/resume point set in the main process reaches
    persistent workers and the skip counts of the workers reach the main process.
    """

    def __init__(
        self,
        urls: list[str],
        kind: Kind,
        image_size: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        max_workers: int = 64,
        group_size: int = 1,
        flip: bool = True,
    ):
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        self.urls, self.kind, self.image_size, self.batch_size, self.train = urls, kind, image_size, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.resampled, self.group_size = shuffle_buffer, resampled, group_size
        self.flip = flip  # random horizontal flip of training samples (validation is never flipped)
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, batches consumed by this rank)
        self.skips = torch.zeros(max_workers + 1, dtype=torch.int64).share_memory_()  # slot 0: main process

    def set_position(self, epoch: int, batches: int) -> None:
        self.position[0], self.position[1] = epoch, batches

    @property
    def num_skipped(self) -> int:
        return int(self.skips.sum())

    def skip_and_warn(self, exn: Exception) -> bool:
        """webdataset handler: count and warn, never sleep (unlike `wds.warn_and_continue`)."""
        info = get_worker_info()
        self.skips[0 if info is None else info.id + 1] += 1
        log.warning("skipping bad sample or shard: %s: %s", type(exn).__name__, exn)
        return True

    def check_tail(self, url: str) -> bool:
        """Warn about (and count) a local shard without the tar end-of-archive blocks: Python's tarfile reads a
        shard cut at a member boundary as a shorter valid one. Its intact samples are still read."""
        if not _is_url(url):
            with open(url, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 1024))
                tail = f.read()
            if size % 512 or tail != bytes(len(tail)):
                self.skip_and_warn(EOFError(f"shard {url} is truncated (no end-of-archive marker)"))
        return True

    def rank_shards(self, epoch: int) -> list[str]:
        """This rank's shards for a non-resampled epoch (same permutation on all ranks, equal count per rank)."""
        urls = list(self.urls)
        if self.train:
            random.Random(f"{self.seed}/{epoch}").shuffle(urls)
            urls = urls[: len(urls) // self.world_size * self.world_size]
        return urls[self.rank :: self.world_size]

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> Iterator[str]:
        if not self.resampled:
            yield from self.rank_shards(epoch)[worker::num_workers]
            return
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
        while True:  # with replacement, forever; the loader's epoch_length ends the epoch
            yield rng.choice(self.urls)

    def decode(self, sample: dict, epoch: int) -> dict:
        flip = self.train and self.flip and _coin(self.seed, epoch, sample["__key__"])
        label = int(sample["cls"])
        if self.kind == "image":
            img = center_crop_arr(decode_image(image_bytes(sample)), self.image_size)
            return {"image": to_tensor(img, flip), "label": label}  # (3, H, W) in [-1, 1]
        name = CACHE_FIELDS[self.kind]
        arr = np.load(io.BytesIO(sample[f"{name}_flip.npy" if flip else f"{name}.npy"]))
        x = torch.from_numpy(arr)
        return {name: x.float() if self.kind == "latent" else x.long(), "label": label}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, consumed = int(self.position[0]), int(self.position[1])
        # The DataLoader takes batches round-robin from its workers, starting with worker 0. After `consumed`
        # batches the next one is due from logical worker `consumed % num_workers`, so DataLoader worker w plays
        # logical worker (w + consumed) % num_workers (its shards, its RNG) and skips the batches it delivered.
        worker = (loader_worker + consumed) % num_workers
        skip = (consumed // num_workers + int(worker < consumed % num_workers)) * self.batch_size
        src = ({"url": u} for u in self.worker_shards(epoch, worker, num_workers) if self.check_tail(u))
        samples = wds.tariterators.tarfile_samples(src, handler=self.skip_and_warn)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}/shuffle")
            # starts yielding after 100 samples and grows to the full buffer (webdataset's default behaviour)
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        if self.group_size > 1:
            samples = group_by_class(samples, self.group_size)
        batch = []
        for sample in itertools.islice(samples, skip, None):  # replayed samples are not decoded
            try:
                if self.group_size > 1:  # MRAR: n distinct images of one class, each augmented on its own
                    parts = [self.decode(s, epoch) for s in sample]
                    batch.append({k: torch.stack([p[k] for p in parts]) if k != "label" else parts[0][k]
                                  for k in parts[0]})  # fmt: skip
                else:
                    batch.append(self.decode(sample, epoch))
            except Exception as exn:
                self.skip_and_warn(exn)
                continue
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch = []
        if batch:
            yield default_collate(batch)


class ShardLoader:
    """DataLoader over a `ShardStream` that knows its epoch and position and can resume mid-epoch."""

    def __init__(self, dataset: ShardStream, epoch_length: int | None = None, **loader_kwargs):
        self.dataset = dataset
        self.loader = DataLoader(dataset, batch_size=None, **loader_kwargs)
        self.epoch_length = epoch_length
        self.epoch = 0
        self.batches = 0  # batches of this epoch the consumer has moved past
        self.restored = False  # a mid-epoch position was loaded and its pass has not started

    @property
    def sampler(self) -> "ShardLoader":
        # Lightning calls `loader.sampler.set_epoch(epoch)` at every epoch start; this routes it to us
        return self

    def set_epoch(self, epoch: int) -> None:
        if self.restored:
            # a restored mid-epoch position wins: after a checkpoint saved at the end of `fit` Lightning resumes
            # with the next epoch's number while the data pass is still the interrupted one
            self.restored = False
            return
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("the number of batches per epoch is unknown without epoch_length")
        return self.epoch_length

    def __iter__(self) -> Iterator[dict]:
        self.dataset.set_position(self.epoch, self.batches)
        remaining = None if self.epoch_length is None else self.epoch_length - self.batches
        if remaining is None or remaining > 0:
            for batch in itertools.islice(self.loader, remaining):
                yield batch
                # counted once the consumer asks for the next batch, i.e. after Lightning's one-batch prefetch
                # has handed it to training_step, so a checkpoint taken after step k records exactly k batches
                self.batches += 1
        self.epoch, self.batches = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "batch_size": self.dataset.batch_size,
            "world_size": self.dataset.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores rank 0's state on every rank; ranks move in lockstep, so its batch count is everyone's.
        # A different world/batch size keeps the global sample position.
        samples = state["batches"] * state["batch_size"] * state["world_size"]
        self.epoch = state["epoch"]
        self.batches = samples // (self.dataset.batch_size * self.dataset.world_size)
        self.restored = self.batches > 0


class WebDataModule(L.LightningDataModule):
    """Image / latent-cache / token-cache shards -> dict batches (see docs/CONTRACT.md).

    Args:
        train_shards / val_shards: path, folder, brace pattern, URL, or list of them. Val is also used for test.
        kind: "image" (ADM center crop + random flip, [-1, 1]), "latent" (`moments`), "tokens" (`tokens`).
        batch_size: per rank. epoch_length: batches per rank and epoch (required with `resampled=True`;
            without it, caps an exact epoch).
        shuffle_buffer: samples per worker mixed before batching (ImageNet: >= a shard's worth, e.g. 1000-5000).
        group_size: >1 makes each training item a group of that many distinct images of one class, batched as
            (B, n, ...) (MRAR training: 4); validation stays ungrouped.
        flip: random horizontal flip of training samples (off for digits, text, any orientation-bound data);
            validation samples are never flipped.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        kind: Kind = "image",
        image_size: int = 256,
        num_classes: int = 1000,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 4,
        group_size: int = 1,
        flip: bool = True,
    ):
        super().__init__()
        if kind not in ("image", "latent", "tokens"):
            raise ValueError(f"kind must be 'image', 'latent' or 'tokens', got {kind!r}")
        if resampled and not epoch_length:
            raise ValueError("resampled=True streams forever: set epoch_length (batches per rank and epoch)")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.kind, self.image_size, self.num_classes = kind, image_size, num_classes
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.resampled, self.epoch_length, self.seed = resampled, epoch_length, seed
        self.pin_memory, self.persistent_workers, self.prefetch_factor = pin_memory, persistent_workers, prefetch_factor
        self.group_size, self.flip = group_size, flip
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self.streams: list[ShardStream] = []

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            if self.train_shards is None:
                raise ValueError("train_shards is not set")
            self.train_urls = expand_shards(self.train_shards)
        self.val_urls = expand_shards(self.val_shards)
        if stage in ("validate", "test") and not self.val_urls:
            raise ValueError(f"{stage} needs val_shards")

    @property
    def num_skipped(self) -> int:
        """Corrupt samples/shards skipped so far by all loaders built by this DataModule (log it as a metric)."""
        return sum(s.num_skipped for s in self.streams)

    def rank_world(self) -> tuple[int, int]:
        """Global rank and world size from the Trainer, else torch.distributed, else (0, 1) (not env RANK)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _loader_kwargs(self, num_workers: int) -> dict:
        kw = {"num_workers": num_workers, "pin_memory": self.pin_memory and torch.cuda.is_available()}
        if num_workers > 0:
            kw.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        return kw

    def build_train_loader(self, rank: int, world_size: int) -> ShardLoader:
        if not self.train_urls:
            self.setup("fit")
        if not self.resampled and len(self.train_urls) < world_size:
            raise ValueError(
                f"{len(self.train_urls)} train shards for {world_size} ranks: a rank without shards hangs DDP; "
                "write more (smaller) shards or use resampled=True"
            )
        if not self.resampled and len(self.train_urls) % world_size and rank == 0:
            log.warning(
                "%d train shards do not divide over %d ranks: %d shards (a different set every epoch) are left out "
                "of each epoch to keep the ranks in step",
                len(self.train_urls),
                world_size,
                len(self.train_urls) % world_size,
            )
        stream = ShardStream(
            self.train_urls, self.kind, self.image_size, self.batch_size, train=True, seed=self.seed, rank=rank,
            world_size=world_size, shuffle_buffer=self.shuffle_buffer, resampled=self.resampled,
            max_workers=self.num_workers, group_size=self.group_size, flip=self.flip,
        )  # fmt: skip
        self.streams.append(stream)
        shards_per_rank = len(self.train_urls) // world_size
        num_workers = self.num_workers if self.resampled else min(self.num_workers, shards_per_rank)
        return ShardLoader(stream, self.epoch_length, **self._loader_kwargs(num_workers))

    def build_val_loader(self, rank: int, world_size: int) -> DataLoader:
        """Val shards in fixed order, no augmentation, split `rank::world` (ranks may get unequal counts)."""
        if not self.val_urls:
            self.setup("validate")
        if len(self.val_urls) < world_size:
            raise ValueError(f"{len(self.val_urls)} val shards for {world_size} ranks: write more val shards")
        stream = ShardStream(
            self.val_urls, self.kind, self.image_size, self.val_batch_size, train=False, rank=rank,
            world_size=world_size, shuffle_buffer=0, max_workers=self.num_workers,
        )  # fmt: skip
        self.streams.append(stream)
        num_workers = min(self.num_workers, len(stream.rank_shards(0)))
        return DataLoader(stream, batch_size=None, **self._loader_kwargs(num_workers))

    def train_dataloader(self) -> ShardLoader:
        return self.build_train_loader(*self.rank_world())

    def val_dataloader(self) -> DataLoader | list:
        return self.build_val_loader(*self.rank_world()) if self.val_shards is not None else []

    def test_dataloader(self) -> DataLoader:
        return self.build_val_loader(*self.rank_world())

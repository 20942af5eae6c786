"""Which images an evaluation generates, and how ranks share the work (used by FIDCallback and `ardiff sample`).

Global sample index i in [0, N) has label `i * C // N` (exactly N/C per class, in class order, when C divides N, as
MAR's `np.arange(C).repeat(N // C)`). Indices are grouped into chunks of `chunk_size`; chunk k is generated in one
`sample_images` call with a CPU `torch.Generator` seeded `seed + k`, and chunks are dealt round-robin to ranks. The
sample set therefore depends on (N, C, chunk_size, seed) only, not on the world size or the device. Every call gets
exactly `chunk_size` labels (the last chunk is padded with its last label, the extra images are dropped), and every
rank makes the same number of calls (ranks short of chunks run a throwaway one), so sharded (FSDP2) models, whose
forward is a collective, stay in lockstep.
"""

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

SampleFn = Callable[..., Tensor]  # sample_images(labels (B,), generator, **overrides) -> (B,3,H,W) in [-1,1]


@dataclass(frozen=True)
class SamplePlan:
    num_samples: int
    num_classes: int
    chunk_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.num_samples > 0 and self.num_classes > 0 and self.chunk_size > 0, self

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_size)

    def labels(self, indices: Tensor) -> Tensor:
        return indices * self.num_classes // self.num_samples

    def chunk_indices(self, k: int) -> Tensor:
        return torch.arange(k * self.chunk_size, min((k + 1) * self.chunk_size, self.num_samples))

    def chunk_labels(self, k: int) -> Tensor:
        """(chunk_size,) int64 labels of chunk k, the last chunk padded with its last label."""
        labels = self.labels(self.chunk_indices(k))
        return torch.cat([labels, labels[-1:].expand(self.chunk_size - labels.numel())])

    def generator(self, k: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + k)

    def rank_chunks(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_chunks, world_size))

    def calls_per_rank(self, world_size: int) -> int:
        return math.ceil(self.num_chunks / world_size)


def to_uint8(images: Tensor) -> Tensor:
    """[-1,1] float (B,3,H,W) -> uint8 (B,3,H,W), rounded like MAR (`round(clip((x+1)/2*255))`)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def generate_chunk(sample_fn: SampleFn, plan: SamplePlan, k: int, device: torch.device, **overrides) -> Tensor:
    """uint8 images (n,3,H,W) of chunk k's n valid indices (padding dropped)."""
    labels = plan.chunk_labels(k).to(device)
    images = sample_fn(labels, generator=plan.generator(k), **overrides)  # (chunk_size, 3, H, W)
    return to_uint8(images[: plan.chunk_indices(k).numel()])


def iter_rank_chunks(
    sample_fn: SampleFn, plan: SamplePlan, rank: int, world_size: int, device: torch.device, **overrides
) -> Iterator[tuple[int, Tensor]]:
    """Yield (chunk id, uint8 images) for this rank's chunks, then run throwaway calls up to the common call count."""
    mine = plan.rank_chunks(rank, world_size)
    for k in mine:
        yield k, generate_chunk(sample_fn, plan, k, device, **overrides)
    for _ in range(plan.calls_per_rank(world_size) - len(mine)):
        sample_fn(plan.chunk_labels(0).to(device), generator=plan.generator(0), **overrides)  # lockstep filler


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put the module in eval mode for sampling, restoring train mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)

"""FSDP2 for ardiff: Lightning's `ModelParallelStrategy` with pure data-parallel defaults and torchtitan's policies.

`ModelParallelStrategy` defaults to data_parallel_size = number of nodes and tensor_parallel_size = GPUs per node.
ardiff shards with FSDP2 only (`GenerativeModule.configure_model` applies `fully_shard` per block on the
data-parallel mesh), so those defaults would give every GPU of a node the same data. Here "auto" means the whole
world is data parallel.

Mixed precision as torchtitan does it: under `precision: bf16-mixed` every `fully_shard` gets
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the fp32 master parameters stay sharded, each block
all-gathers bf16 copies for forward/backward, and gradients are reduce-scattered in fp32. Lightning's autocast is
switched off for the sharded forward (`FSDP2BF16Precision`), so nothing is cast twice. Reshard policy
(`reshard_after_forward`): "default" frees each block's gathered parameters after its forward and keeps the root's
(embeddings, heads: backward needs them at once), "always" frees all, "never" keeps all (ZeRO-2-like: more
memory, fewer all-gathers).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy

from models.checkpoint import CHECKSUM_SUFFIX, check_checkpoint_file, verify_checksum, write_checksum

ReshardPolicy = Literal["default", "always", "never"]


def shutdown_distributed() -> None:
    """Tear the default process group down before the interpreter exits (all ranks). Lightning leaves it up; gloo's
    threads then meet interpreter finalisation and a finished run can abort (`terminate called without an active
    exception`, exit -6), which a scheduler reads as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class FSDP2BF16Precision(MixedPrecision):
    """`bf16-mixed` under FSDP2's MixedPrecisionPolicy: the policy casts parameters per block; no autocast."""

    def __init__(self) -> None:
        super().__init__("bf16-mixed", device="cpu")  # device only matters for autocast, which is not used

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        yield


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard` per transformer block) over all ranks; runs on GPUs (nccl) and on CPU (gloo).

    Args:
        mixed_precision: under `bf16-mixed`, shard with `MixedPrecisionPolicy(bf16 params, fp32 reduce)` instead of
            Lightning's autocast (False: fp32 shards under autocast, as before).
        reshard_after_forward: "default" (blocks yes, root no), "always" or "never".
    """

    strategy_name = "ardiff_fsdp2"

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        mixed_precision: bool = True,
        reshard_after_forward: ReshardPolicy = "default",
        **kwargs: Any,
    ) -> None:
        if reshard_after_forward not in ("default", "always", "never"):
            raise ValueError(f"reshard_after_forward must be default, always or never, got {reshard_after_forward!r}")
        self.mixed_precision, self.reshard_after_forward = mixed_precision, reshard_after_forward
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if (
            getattr(self, "mixed_precision", False)
            and isinstance(plugin, MixedPrecision)
            and plugin.precision == "bf16-mixed"
        ):
            plugin = FSDP2BF16Precision()
        self._precision_plugin = plugin

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # torch.distributed.checkpoint unpickles `.metadata` (and non-tensor items) without restriction: every rank
        # vets the folder it is about to read with the allow-list loaders first
        path = self.broadcast(checkpoint_path)
        check_checkpoint_file(os.fspath(path))
        return super().load_checkpoint(path, weights_only=weights_only)

    def fully_shard_kwargs(self, root: bool) -> dict[str, Any]:
        """Keyword arguments of `fully_shard` for a block (root=False) or the whole net (root=True)."""
        reshard = {"always": True, "never": False, "default": not root}[self.reshard_after_forward]
        kwargs: dict[str, Any] = {"reshard_after_forward": reshard}
        if isinstance(self.precision_plugin, FSDP2BF16Precision):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return kwargs


class ChecksumCheckpointIO(CheckpointIO):
    """Wraps a strategy's CheckpointIO: every checkpoint file gets `<file>.sha256` beside it, verified on load
    (`models.checkpoint.verify_checksum`; ARDIFF_SKIP_CHECKSUM=1 overrides). Distributed checkpoint folders are
    written by the strategy itself and carry no checksum."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        if os.path.isfile(path):
            write_checksum(path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if os.path.isfile(path):
            verify_checksum(path)
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        if os.path.isfile(os.fspath(path) + CHECKSUM_SUFFIX):
            os.remove(os.fspath(path) + CHECKSUM_SUFFIX)

    def teardown(self) -> None:
        self.inner.teardown()

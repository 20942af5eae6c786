"""FSDP2 for ardiff: Lightning's `ModelParallelStrategy` with pure data-parallel defaults.

`ModelParallelStrategy` defaults to data_parallel_size = number of nodes and tensor_parallel_size = GPUs per node.
ardiff shards with FSDP2 only (`GenerativeModule.configure_model` applies `fully_shard` per block on the
data-parallel mesh), so those defaults would give every GPU of a node the same data. Here "auto" means the whole
world is data parallel.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from models.checkpoint import CHECKSUM_SUFFIX, check_checkpoint_file, verify_checksum, write_checksum


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard` per transformer block) over all ranks; runs on GPUs (nccl) and on CPU (gloo)."""

    strategy_name = "ardiff_fsdp2"

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

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

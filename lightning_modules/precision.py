"""bf16 autocast where it is faster on the machine at hand, decided by timing the first training steps.

CPUs differ: on AVX2-only CPUs bf16 matmuls are slower than fp32, on AVX512-BF16 / AMX ones several times faster, and
on GPUs bf16 is the norm. `AutoBF16Precision` (a `trainer.plugins` entry, in place of `trainer.precision`) times real
training steps in both precisions at the start of a fit and keeps the faster one for the rest of the run:

    trainer:
      plugins:
        - class_path: lightning_modules.precision.AutoBF16Precision

Steps 0 and 1 warm up fp32 and bf16 (untimed); steps 2 .. 2 + 2 * probe_steps alternate fp32 / bf16 and are timed
from the start of the training step to the end of its last backward (data loading and optimizer step excluded);
then the medians decide: bf16-mixed if fp32 / bf16 >= min_speedup, else 32-true. Rank 0's decision is broadcast.
The decision is printed and stored in the checkpoint, so a resumed run goes on in the same precision.

On CPU, scaled-dot-product attention stays in fp32 under bf16 autocast: torch's CPU flash attention is slower in
bf16 than in fp32 (torch 2.14, AVX512-BF16: 2.7x for forward + backward of a (64, 4, 64, 32) attention, 8x for the
backward kernels inside the tiny TransDiff step), which cancels the bf16 gain of the linear layers
(tiny TransDiff demo step, 2-core EPYC: fp32 0.24 s, bf16 0.26 s, bf16 with fp32 attention 0.12 s).
Sampling in callbacks runs outside the training step and stays fp32.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Generator
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


def _up(x: Any) -> Any:
    return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x


class FP32AttentionOnCPU(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` on bf16 CPU tensors in fp32 (inputs cast up, output cast back)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].dtype == torch.bfloat16 and args[0].device.type == "cpu":
            with torch.autocast("cpu", enabled=False):
                out = func(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
            return out.to(torch.bfloat16)
        return func(*args, **kwargs)


class BF16Precision(MixedPrecision):
    """`bf16-mixed` autocast (what ardiff uses for `trainer.precision: bf16-mixed`), with two fixes to Lightning's:

    - gradient clipping works with fused optimizers: Lightning refuses it for any optimizer that unscales internally
      (fused AdamW), which only matters for fp16's GradScaler; bf16 has no scaler and nothing to unscale;
    - on CPU, scaled-dot-product attention runs in fp32 (see the module docstring).
    """

    def __init__(self, device: str = "cpu") -> None:
        super().__init__("bf16-mixed", device=device)

    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple:
        param = next(model.parameters(), None)
        self.device = param.device.type if param is not None else self.device
        return super().connect(model, optimizers, lr_schedulers)

    def clip_gradients(self, optimizer: Any, clip_val: float = 0.0, gradient_clip_algorithm: Any = None) -> None:
        algorithm = gradient_clip_algorithm or GradClipAlgorithmType.NORM
        Precision.clip_gradients(self, optimizer, clip_val=clip_val, gradient_clip_algorithm=algorithm)

    @contextlib.contextmanager
    def _precision(self, bf16: bool) -> Generator[None, None, None]:
        with contextlib.ExitStack() as stack:
            if bf16:
                stack.enter_context(self.autocast_context_manager())
                if self.device == "cpu":
                    stack.enter_context(FP32AttentionOnCPU())
            yield

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with self._precision(True):
            yield


class AutoBF16Precision(BF16Precision):
    """`bf16-mixed` if it measures faster than fp32 for this model on this machine, else `32-true`.

    Args:
        probe_steps: timed steps per precision (after one warm-up step each); 0 skips the measurement (bf16).
        min_speedup: fp32 / bf16 median step time needed to choose bf16.
    """

    def __init__(self, probe_steps: int = 3, min_speedup: float = 1.1) -> None:
        if probe_steps < 0 or min_speedup <= 0:
            raise ValueError(f"need probe_steps >= 0, min_speedup > 0; got {probe_steps}, {min_speedup}")
        super().__init__()  # device: set from the model in connect()
        self.probe_steps, self.min_speedup = probe_steps, min_speedup
        self.use_bf16: bool | None = True if probe_steps == 0 else None  # None: still measuring
        self.speedup: float | None = None
        self._step = 0  # probe steps begun
        self._times: dict[bool, list[float]] = {False: [], True: []}  # bf16? -> step times (s)
        self._timing: tuple[bool, float] | None = None  # (bf16?, start) of the step being timed
        self._backward_end = 0.0

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with self._precision(bool(self.use_bf16)):  # validation / predict: fp32 until decided
            yield

    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        if self.use_bf16 is None:  # still measuring: close the previous step's timing, then time this one
            if self._timing is not None and self._backward_end:
                bf16, start = self._timing
                self._times[bf16].append(self._backward_end - start)
            if self._step == 2 + 2 * self.probe_steps:
                self._decide()
        if self.use_bf16 is not None:
            with self._precision(self.use_bf16):
                yield
            return
        bf16 = self._step % 2 == 1  # step 0: fp32 warm-up, 1: bf16 warm-up, then fp32 / bf16 alternating
        self._timing = (bf16, time.perf_counter()) if self._step >= 2 else None
        self._backward_end, self._step = 0.0, self._step + 1
        with self._precision(bf16):
            yield

    def post_backward(self, tensor: Tensor, module: Any) -> Tensor:
        self._backward_end = time.perf_counter()
        return super().post_backward(tensor, module)

    def _decide(self) -> None:
        fp32, bf16 = (statistics.median(self._times[k]) if self._times[k] else float("nan") for k in (False, True))
        speedup = fp32 / bf16 if bf16 > 0 else 0.0
        decision = [speedup >= self.min_speedup, speedup]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(decision, src=0)  # every rank trains in rank 0's precision
        self.use_bf16, self.speedup = bool(decision[0]), float(decision[1])
        rank_zero_info(
            f"AutoBF16Precision: median training step fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s (speedup "
            f"{speedup:.2f}x, needed {self.min_speedup}x; CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, device {self.device}) -> training in "
            f"{'bf16-mixed' if self.use_bf16 else '32-true'}"
        )

    def state_dict(self) -> dict[str, Any]:
        # mid-probe, also its progress: a run resumed there goes on with the same precision sequence (exact resume)
        times = {k: list(v) for k, v in self._times.items()}
        if self.use_bf16 is None and self._timing is not None and self._backward_end:  # the step just finished
            times[self._timing[0]].append(self._backward_end - self._timing[1])
        return {"use_bf16": self.use_bf16, "speedup": self.speedup, "probe_step": self._step,
                "probe_times_fp32": times[False], "probe_times_bf16": times[True]}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.use_bf16, self.speedup = state_dict.get("use_bf16"), state_dict.get("speedup")
        self._step = int(state_dict.get("probe_step", 0))
        self._times = {
            False: list(state_dict.get("probe_times_fp32", [])),
            True: list(state_dict.get("probe_times_bf16", [])),
        }
        self._timing, self._backward_end = None, 0.0

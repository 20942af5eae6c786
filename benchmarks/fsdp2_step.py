"""FSDP2 training step on 2 CPU processes (gloo), with and without the bf16 MixedPrecisionPolicy.

Rows (TransDiff tiny in pixel space, or a wider TransDiff with --arch, through the real Trainer + FSDP2Strategy):
  fp32            precision 32-true: fp32 shards, fp32 compute, fp32 reduce-scatter
  bf16 autocast   precision bf16-mixed, FSDP2Strategy(mixed_precision=False): fp32 shards under Lightning's autocast
  bf16 policy     precision bf16-mixed, FSDP2Strategy(): MixedPrecisionPolicy(bf16 params, fp32 reduce), no autocast
Seconds per optimizer step (median of the timed steps after --warmup), global images/s. On CPU the bf16 figures say
little about a GPU (no bf16 matrix units without AMX; gloo collectives): the point is that the policy runs and what
it costs here; on GPUs the policy halves all-gather bytes and runs matmuls in bf16 without per-op autocast casts.

    python -m benchmarks.fsdp2_step --steps 8 --json fsdp2_step.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch


def worker(a: argparse.Namespace) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from lightning_modules.strategies import FSDP2Strategy
    from lightning_modules.transdiff import TransDiffModule

    class Images(Dataset):
        def __init__(self, n: int, size: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
            self.y = torch.randint(0, 10, (n,), generator=g)

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> dict:
            return {"image": self.x[i], "label": self.y[i]}

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter() - self.t0)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    module = TransDiffModule(arch=a.arch, vae="identity", lr=1e-4, ema_decay=None)
    precision = "32-true" if a.mode == "fp32" else "bf16-mixed"
    strategy = FSDP2Strategy(mixed_precision=a.mode == "policy")
    timer = Timer()
    trainer = L.Trainer(
        max_steps=a.warmup + a.steps, accelerator="cpu", devices=2, strategy=strategy, precision=precision,
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[timer],
    )  # fmt: skip
    size = module.net.cfg.img_size
    data = DataLoader(Images(a.batch * 2 * (a.warmup + a.steps), size), batch_size=a.batch)
    trainer.fit(module, data)
    if trainer.global_rank == 0:
        s = statistics.median(timer.times[a.warmup :])
        params = sum(p.numel() for p in module.net.parameters())  # DTensor.numel(): the global count
        print(f"RESULT {a.mode} {s:.4f} {2 * a.batch / s:.2f} {params / 1e6:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", help="TransDiff preset (pixel space, IdentityAutoencoder)")
    p.add_argument("--batch", type=int, default=16, help="per-rank batch")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--modes", default="fp32,autocast,policy")
    p.add_argument("--json", default="fsdp2_step.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.mode = a.worker
        worker(a)
        return 0

    from benchmarks.common import report

    rows = []
    labels = {"fp32": "fp32", "autocast": "bf16 autocast", "policy": "bf16 policy"}
    for mode in a.modes.split(","):
        cmd = [sys.executable, "-m", "benchmarks.fsdp2_step", "--worker", mode, "--arch", a.arch]
        cmd += [
            "--batch",
            str(a.batch),
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
            "--threads",
            str(a.threads),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if proc.returncode or not line:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            return 1
        _, _, s, ips, params = line[0].split()
        rows.append(
            {"arch": a.arch, "params_M": float(params), "mode": labels[mode], "world": 2, "global_batch": 2 * a.batch,
             "s_per_step": float(s), "img_per_s": float(ips), "load_1m": round(os.getloadavg()[0], 2)}
        )  # fmt: skip
    report(rows, a.json, "FSDP2 step on 2 CPU processes (gloo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

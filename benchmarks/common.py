"""Timing, matmul-peak measurement and table output shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 1, iters: int = 3, device: str = "cpu") -> float:
    """Median wall-clock seconds of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, iters: int = 5) -> float:
    """Measured dense matmul rate in FLOP/s for square `n`x`n` operands (the practical peak of this machine)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, warmup=2, iters=iters, device=device)
    return 2 * n**3 / seconds


def machine() -> dict[str, str | int]:
    info: dict[str, str | int] = {"python": platform.python_version(), "torch": torch.__version__}
    info["cpu"] = platform.processor() or platform.machine()
    info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(rows: list[dict], json_path: str | Path, title: str, columns: list[str] | None = None) -> None:
    """Print a markdown table and write rows + machine facts as JSON."""
    print(f"### {title}\n")
    print(markdown_table(rows, columns))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(f"\n(written to {json_path})")

"""`ardiff convert-ckpt SHARDED_DIR OUT.ckpt`: a distributed (FSDP2 / ModelParallelStrategy) checkpoint folder
to one single-file Lightning checkpoint that resumes under any strategy and world size (single, DDP, FSDP2).

Optimizer states in a distributed checkpoint are keyed by parameter name; a plain optimizer state is keyed by
position in its param groups, so they are renumbered in the order the groups list the names.

The folder is untrusted input: its `.metadata` and non-tensor items are vetted with allow-list unpicklers
(`models.checkpoint.check_distributed_checkpoint`) before the public `dcp_to_torch_save` reads it.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from models.checkpoint import check_distributed_checkpoint, safe_torch_load


def _renumber_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    groups = state.get("param_groups", [])
    if not groups or not all(isinstance(p, str) for g in groups for p in g["params"]):
        return state  # already positional
    index, new_groups = {}, []
    for g in groups:
        ids = []
        for name in g["params"]:
            index[name] = len(index)
            ids.append(index[name])
        new_groups.append({**g, "params": ids})
    return {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": new_groups}


def consolidate(folder: str | Path) -> dict[str, Any]:
    """Read a distributed checkpoint folder into the standard single-file Lightning checkpoint layout."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / ".metadata").is_file():
        raise FileNotFoundError(
            f"{folder} is not a distributed checkpoint folder (expected a '.metadata' file inside); "
            "single-file checkpoints need no conversion"
        )
    check_distributed_checkpoint(folder)  # before any unpickling by torch.distributed.checkpoint
    fd, tmp = tempfile.mkstemp(suffix=".pt", prefix=".convert-")
    os.close(fd)
    try:
        dcp_to_torch_save(folder, tmp)
        ckpt = safe_torch_load(tmp)
    finally:
        os.unlink(tmp)
    if (folder / "meta.pt").is_file():  # Lightning's non-tensor state (loops, callbacks, hyperparameters)
        ckpt.update(safe_torch_load(folder / "meta.pt"))
    if "model" in ckpt:  # Fabric's layout; Lightning's Trainer already writes "state_dict"
        ckpt["state_dict"] = ckpt.pop("model")
    opt_keys = sorted((k for k in ckpt if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    if opt_keys:
        ckpt["optimizer_states"] = [_renumber_optimizer_state(ckpt.pop(k)) for k in opt_keys]
    return ckpt


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ardiff convert-ckpt", description=__doc__)
    p.add_argument("folder", help="distributed checkpoint folder written under FSDP2 (ModelParallelStrategy)")
    p.add_argument("output", help="single-file checkpoint to write (.ckpt)")
    a = p.parse_args(argv)
    ckpt = consolidate(a.folder)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    n = sum(v.numel() for v in ckpt["state_dict"].values() if isinstance(v, torch.Tensor))
    step = ckpt.get("global_step")
    print(f"[ardiff] wrote {out} ({len(ckpt['state_dict'])} tensors, {n / 1e6:.2f}M values, step {step})")
    return 0

"""Multi-process training on CPU (gloo): DDP and FSDP2 give the same losses and weights as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# (module, init kwargs, dataset factory): every generator of the project is checked the same way.
MODELS = {
    "toy": ("tests.toy:ToyGenerator", {"lr": 1e-2, "ema_decay": 0.5, "noise_std": 0.5}, "tests.toy:toy_dataset"),
    "transdiff_tiny": (
        "lightning_modules.transdiff:TransDiffModule",
        {"arch": "tiny", "vae": "identity", "lr": 1e-3, "ema_decay": 0.9},
        "tests.toy:RandomImages",
    ),
    "dar_tokenizer_tiny": (
        "lightning_modules.dar:DARTokenizerModule",
        {"config": "tiny", "lpips_weight": 0.0, "repa_weight": 0.0, "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.9},
        "tests.toy:RandomImages",
    ),
    "dar_gpt_tiny": (
        "lightning_modules.dar:DARGPTModule",
        {"gpt": "tiny", "lr": 1e-3, "decay_start_step": 100, "total_steps": 200, "ema_decay": 0.9},
        "tests.toy:RandomTokens",
    ),
}


def run_worker(tmp_path: Path, strategy: str, name: str, steps: int = 3, **extra: str) -> dict:
    module, kwargs, dataset = MODELS[name]
    out = tmp_path / f"{name}-{strategy}-{len(list(tmp_path.iterdir()))}.pt"
    cmd = [sys.executable, "-m", "tests.dist_worker", "--strategy", strategy, "--module", module]
    cmd += ["--kwargs", json.dumps(kwargs), "--dataset", dataset, "--steps", str(steps), "--out", str(out)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", v]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


def assert_same_run(a: dict, b: dict) -> None:
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-4, atol=1e-5)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", list(MODELS))
def test_ddp_and_fsdp2_match_single_process(tmp_path, name):
    single = run_worker(tmp_path, "single", name)
    assert len(single["losses"]) == 3
    assert_same_run(run_worker(tmp_path, "ddp", name), single)
    assert_same_run(run_worker(tmp_path, "fsdp2", name), single)


def test_fsdp2_sharded_checkpoint_resumes(tmp_path):
    straight = run_worker(tmp_path, "fsdp2", "toy", steps=4)
    ckpt = tmp_path / "sharded.ckpt"
    run_worker(tmp_path, "fsdp2", "toy", steps=2, ckpt_out=str(ckpt))
    assert ckpt.is_dir(), "ModelParallelStrategy writes a distributed (sharded) checkpoint directory"
    resumed = run_worker(tmp_path, "fsdp2", "toy", steps=4, resume=str(ckpt))
    assert resumed["global_step"] == 4
    for k in straight["state"]:
        torch.testing.assert_close(resumed["state"][k], straight["state"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_converted_fsdp2_checkpoint_resumes_under_other_world_sizes(tmp_path):
    from ardiff.convert import main as convert

    straight = run_worker(tmp_path, "single", "toy", steps=4)
    sharded = tmp_path / "sharded.ckpt"
    run_worker(tmp_path, "fsdp2", "toy", steps=2, ckpt_out=str(sharded))
    single_file = tmp_path / "full.ckpt"
    assert convert([str(sharded), str(single_file)]) == 0
    for strategy in ("single", "ddp"):
        resumed = run_worker(tmp_path, strategy, "toy", steps=4, resume=str(single_file))
        assert resumed["global_step"] == 4
        for k in straight["state"]:
            torch.testing.assert_close(resumed["state"][k], straight["state"][k], rtol=1e-4, atol=1e-5, msg=k)

"""Preemption and bad input, through the real `ardiff fit` command on the tiny demo models.

- a run killed with SIGTERM mid-epoch and resumed with `ckpt_path=last` ends with the same weights as an
  uninterrupted run of the same number of steps (step count, optimizer, schedule, EMA, RNG and data position);
- a truncated checkpoint and an incompatible checkpoint are reported clearly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from models.checkpoint import safe_torch_load

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from ardiff.cli import main; sys.exit(main())"]


def demo_config(tmp: Path, demo_root: Path, name: str, max_steps: int, every: int = 4) -> Path:
    """The TransDiff demo recipe, shortened, with its own output folder and periodic + preemption checkpoints."""
    cfg = yaml.safe_load((ROOT / "experiments/transdiff/demo.yaml").read_text())
    out = tmp / name
    cfg["data"]["init_args"].update(root=str(demo_root), batch_size=16, num_workers=1)
    cfg["model"]["init_args"]["ema_decay"] = 0.99  # the EMA must continue across the kill too
    cfg["trainer"].update(max_steps=max_steps, logger=False, default_root_dir=str(out), log_every_n_steps=1)
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(out / "ckpt"),
                "save_last": True,
                "save_top_k": 0,
                "every_n_train_steps": every,
            },
        },
        {"class_path": "callbacks.preemption.PreemptionCheckpoint"},
    ]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`ardiff fit -c CFG EXTRA...` in a fresh process."""
    return subprocess.run(
        [*CLI, "fit", "-c", str(cfg), *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = safe_torch_load(run / "ckpt" / "last.ckpt")
    return ckpt["state_dict"], ckpt["global_step"]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, demo_root):
    steps = 12
    straight_cfg = demo_config(tmp_path, demo_root, "straight", steps)
    proc = fit(straight_cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]

    killed_cfg = demo_config(tmp_path, demo_root, "killed", steps)
    child = subprocess.Popen(
        [*CLI, "fit", "-c", str(killed_cfg)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = tmp_path / "killed" / "ckpt" / "last.ckpt"  # written at step 4 by the periodic checkpoint
    deadline = time.time() + 600
    while not first.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert child.poll() is None, "the run finished before it could be killed:\n" + child.stdout.read()[-3000:]
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=300)
    assert "preempted at step" in out, out[-3000:]
    _, stopped_at = final_weights(tmp_path / "killed")
    assert 4 <= stopped_at < steps, f"the kill should land mid-run, got step {stopped_at}"

    proc = fit(killed_cfg, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed, step = final_weights(tmp_path / "killed")
    expected, expected_step = final_weights(tmp_path / "straight")
    assert step == expected_step == steps
    assert resumed.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_truncated_checkpoint_is_reported_on_resume(tmp_path, demo_root):
    cfg = demo_config(tmp_path, demo_root, "trunc", 2)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    proc = fit(cfg, "--model.init_args.init_from", str(ckpt))
    assert proc.returncode != 0
    assert f"checkpoint {str(ckpt)!r} is truncated" in proc.stderr


def test_truncated_resume_checkpoint_is_reported_before_training(tmp_path, demo_root):
    cfg = demo_config(tmp_path, demo_root, "trunc_resume", 2)
    ckpt = tmp_path / "cut_resume.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    proc = fit(cfg, "--ckpt_path", str(ckpt))
    assert proc.returncode != 0
    assert f"checkpoint {str(ckpt)!r} is truncated" in proc.stderr


def test_incompatible_checkpoint_names_the_mismatched_tensors(tmp_path, demo_root):
    cfg = demo_config(tmp_path, demo_root, "incompat", 1)
    from lightning_modules.transdiff import TransDiffModule

    model = TransDiffModule(**yaml.safe_load(cfg.read_text())["model"]["init_args"])
    sd = {k: v.clone() for k, v in model.net.state_dict().items()}
    name = next(k for k, v in sd.items() if v.ndim == 2)
    sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])
    sd["not_a_weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save({"model": sd}, bad)
    proc = fit(cfg, "--model.init_args.init_from", str(bad))
    assert proc.returncode != 0
    assert f"{name}: file" in proc.stderr and "not_a_weight" in proc.stderr


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "2")

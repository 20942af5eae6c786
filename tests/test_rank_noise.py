"""Each rank draws its own diffusion noise: a real 2-process run (gloo), seeded only by `seed_everything`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_draw_different_noise_on_the_same_batch(tmp_path):
    out = tmp_path / "losses.pt"
    proc = subprocess.run([sys.executable, "-m", "tests.rank_noise_worker", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    losses = torch.load(out, weights_only=True)["losses"]
    # same weights, same batch: equal losses would mean equal noise, timesteps and label dropout on both ranks
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    assert (losses[0] - losses[1]).abs() > 1e-4, losses

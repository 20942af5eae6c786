"""Untrusted files never execute code: a pickle whose `__reduce__` would create a marker file is refused, with an
error naming the file, on every path that reads one (Inception weights, distributed checkpoint metadata)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from callbacks.inception import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, build_inception
from models.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls `os.mkdir(marker)`: the marker's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_malicious(path: Path, marker: Path, wrap=lambda payload: {"fc.weight": payload}) -> Path:
    torch.save(wrap(_Payload(marker)), path)
    return path


@pytest.fixture
def bad_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    marker = tmp_path / "PWNED"
    return write_malicious(tmp_path / "evil.pth", marker), marker


def test_the_payload_really_runs_code_when_unpickled_unsafely(bad_weights):
    path, marker = bad_weights  # guards the other tests: the file would have created the marker
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_inception_weights_explicit_path_is_refused(bad_weights):
    path, marker = bad_weights
    with pytest.raises(CheckpointError, match="evil.pth"):
        build_inception(str(path), download=False)
    assert not marker.exists()


def test_inception_weights_from_env_and_hub_cache_are_refused(bad_weights, monkeypatch):
    path, marker = bad_weights
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    with pytest.raises(CheckpointError, match="evil.pth"):
        build_inception(None, download=False)
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cache.parent.mkdir(parents=True)
    cache.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=INCEPTION_WEIGHTS_FILE):
        build_inception(None, download=False)
    assert not marker.exists()


def test_fid_callback_refuses_malicious_inception_weights(bad_weights):
    from callbacks.fid import FIDCallback

    path, marker = bad_weights
    cb = FIDCallback(reference=None, inception_weights=str(path), missing_weights="skip")
    with pytest.raises(CheckpointError, match="evil.pth"):  # not a missing file: refused, never skipped silently
        cb.setup(None, None, "fit")
    assert not marker.exists()


def test_ardiff_eval_refuses_malicious_inception_weights(bad_weights, tmp_path):
    path, marker = bad_weights
    import numpy as np

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    cmd = [sys.executable, "-m", "ardiff.cli", "eval", str(tmp_path / "s.npz"), "--ref", "x.npz"]
    proc = subprocess.run([*cmd, "--inception-weights", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "evil.pth" in proc.stderr and "refuses to unpickle" in proc.stderr
    assert not marker.exists()


def test_real_format_inception_weights_still_load(inception_weights):
    model = build_inception(inception_weights, download=False)
    ref = torch.load(inception_weights, weights_only=True)
    torch.testing.assert_close(model.fc.weight, ref["fc.weight"])


# ---------------------------------------------------------------- distributed checkpoint folders
def evil_metadata_folder(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "evil.ckpt"
    folder.mkdir()
    import pickle

    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return folder


def evil_item_folder(tmp_path: Path, marker: Path) -> Path:
    """A well-formed DCP folder (valid metadata) whose one non-tensor item is the payload."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "evil_item.ckpt"
    dcp.save({"w": torch.zeros(3), "extra": _Payload(marker)}, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_dcp_payloads_really_run_code_when_read_unsafely(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    marker = tmp_path / "PWNED"
    dcp_to_torch_save(evil_item_folder(tmp_path, marker), tmp_path / "out.pt")
    assert marker.exists()


@pytest.mark.parametrize("make", [evil_metadata_folder, evil_item_folder])
def test_convert_ckpt_refuses_malicious_distributed_checkpoint(tmp_path, make):
    from ardiff.convert import main as convert

    marker = tmp_path / "PWNED"
    folder = make(tmp_path, marker)
    with pytest.raises(CheckpointError, match=f"{folder.name}.*refuses to unpickle"):
        convert([str(folder), str(tmp_path / "out.ckpt")])
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_fsdp2_strategy_vets_the_folder_before_loading(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_modules.strategies import FSDP2Strategy

    loaded = []
    monkeypatch.setattr(ModelParallelStrategy, "load_checkpoint", lambda self, p, weights_only=None: loaded.append(p))
    marker = tmp_path / "PWNED"
    for folder in (evil_metadata_folder(tmp_path, marker), evil_item_folder(tmp_path, marker)):
        with pytest.raises(CheckpointError, match=folder.name):
            FSDP2Strategy().load_checkpoint(folder)
    assert not loaded and not marker.exists()


def test_fit_ckpt_path_refuses_malicious_distributed_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"
    folder = evil_metadata_folder(tmp_path, marker)
    cmd = [sys.executable, "-m", "ardiff.cli", "fit", "-c", "experiments/transdiff/demo.yaml"]
    cmd += ["-c", "experiments/strategies/fsdp2_cpu.yaml", "--ckpt_path", str(folder)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{folder}/.metadata" in proc.stderr and "refuses to unpickle" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()

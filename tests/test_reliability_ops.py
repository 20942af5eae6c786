"""What a cluster operator hits: preemption exit code and process-group SIGTERM, damaged or shared checkpoint
folders, checksums, empty shard lists, truncated files given to `ardiff sample`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from models.checkpoint import SKIP_CHECKSUM_ENV, CheckpointError, safe_torch_load
from tests.test_resilience import CLI, ROOT, demo_config, fit


def test_checksum_is_written_and_a_flipped_byte_is_refused(tmp_path, monkeypatch):
    from lightning.fabric.plugins import TorchCheckpointIO

    from lightning_modules.strategies import ChecksumCheckpointIO

    io = ChecksumCheckpointIO(TorchCheckpointIO())
    path = tmp_path / "step=4.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(100_000.0)}}, path)
    assert (tmp_path / "step=4.ckpt.sha256").read_text().endswith("  step=4.ckpt\n")
    assert torch.equal(safe_torch_load(path)["state_dict"]["w"], torch.arange(100_000.0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the zip directory is intact
    path.write_bytes(bytes(data))
    for load in (safe_torch_load, io.load_checkpoint):
        with pytest.raises(CheckpointError, match=f"step=4.ckpt.*checksum.*{SKIP_CHECKSUM_ENV}=1"):
            load(path)
    monkeypatch.setenv(SKIP_CHECKSUM_ENV, "1")
    assert not torch.equal(safe_torch_load(path)["state_dict"]["w"], torch.arange(100_000.0))  # loads, corrupt
    io.remove_checkpoint(path)
    assert not (tmp_path / "step=4.ckpt.sha256").exists()


def test_checkpoint_folder_lock(tmp_path):
    from ardiff.cli import LOCK_FILE, acquire_dir_lock

    folder = tmp_path / "ckpt"
    folder.mkdir()
    import socket

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_FILE).write_text(f"{live.pid}@{socket.gethostname()}")
        with pytest.raises(RuntimeError, match=f"in use by another run \\(process {live.pid}@"):
            acquire_dir_lock(str(folder))
    finally:
        live.kill()
        live.wait()
    acquire_dir_lock(str(folder))  # its process is gone: the stale lock is taken over
    assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}@{socket.gethostname()}"
    acquire_dir_lock(str(folder))  # re-entrant in the same process


def test_two_runs_on_one_checkpoint_folder_are_refused(tmp_path, demo_root):
    from ardiff.cli import LOCK_FILE

    cfg = demo_config(tmp_path, demo_root, "shared", 2)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = tmp_path / "shared" / "ckpt" / LOCK_FILE
        lock.parent.mkdir(parents=True)
        import socket

        lock.write_text(f"{holder.pid}@{socket.gethostname()}")
        proc = fit(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert "is in use by another run" in proc.stderr and str(tmp_path / "shared" / "ckpt") in proc.stderr


def test_resume_last_with_truncated_last_ckpt_names_it_and_the_intact_ones(tmp_path, demo_root):
    cfg = demo_config(tmp_path, demo_root, "cut_last", 2)
    ckpt = tmp_path / "cut_last" / "ckpt"
    ckpt.mkdir(parents=True)
    torch.save({"state_dict": {}}, ckpt / "step=4.ckpt")
    time.sleep(0.05)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt / "last.ckpt")
    (ckpt / "last.ckpt").write_bytes((ckpt / "last.ckpt").read_bytes()[:-200])
    proc = fit(cfg, "--ckpt_path", "last")
    assert proc.returncode != 0
    assert f"{ckpt / 'last.ckpt'}" in proc.stderr and "is truncated" in proc.stderr
    assert f"intact checkpoints beside it (newest first): {ckpt / 'step=4.ckpt'}" in proc.stderr, proc.stderr[-2000:]


def test_empty_shard_list_names_the_argument():
    from datamodules.webdataset import WebDataModule

    with pytest.raises(ValueError, match=r"train shard list is empty \(data.init_args.train_shards=\[\]\)"):
        WebDataModule(train_shards=[]).setup("fit")
    with pytest.raises(ValueError, match=r"val shard list is empty \(data.init_args.val_shards=\[\]\)"):
        WebDataModule(train_shards=None, val_shards=[]).setup("validate")


def test_sample_module_on_truncated_checkpoint_names_the_file(tmp_path):
    from ardiff.sample import main as ardiff_sample

    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"checkpoint {str(ckpt)!r} is truncated"):
        ardiff_sample(["--module", "tests.toy.ToyGenerator", "--ckpt", str(ckpt), "--out", str(tmp_path / "s.npz")])


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_with_the_preemption_code(tmp_path, demo_root):
    from ardiff.cli import EXIT_PREEMPTED

    cfg = demo_config(tmp_path, demo_root, "group", 400)
    child = subprocess.Popen(
        [*CLI, "fit", "-c", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as under a launcher
    )  # fmt: skip
    first = tmp_path / "group" / "ckpt" / "last.ckpt"  # periodic checkpoint at step 4: training and workers run
    deadline = time.time() + 600
    while not first.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    assert child.poll() is None, child.stdout.read()[-3000:]
    os.killpg(child.pid, signal.SIGTERM)  # main process and DataLoader worker alike
    out, _ = child.communicate(timeout=300)
    assert child.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "preempted at step" in out, out[-3000:]
    step = safe_torch_load(first)["global_step"]
    assert 4 <= step < 400

"""FIDCallback under 2-process DDP (and FSDP2) on CPU/gloo: the same FID as one process over the same samples, and
every sample index generated exactly once.

The multi-process runs use this file as the training script: `python -m tests.test_eval_ddp --strategy ddp ...`
(Lightning re-launches the same command for rank 1).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy

from callbacks import FIDCallback
from callbacks.sampling import SamplePlan
from tests.test_eval_common import (  # noqa: F401
    FakeGenerator,
    dummy_loader,
    shrink_inception_input,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES, CHUNK = 14, 3  # 5 chunks (the last one padded): rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and a filler


def make_reference(path: Path) -> None:
    """Reference mu/sigma (the ADM layout) of random 2048-d features; no images needed for FID."""
    feats = np.random.default_rng(0).normal(size=(64, 2048)) * 0.1
    np.savez(path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))


def run(strategy: str, devices: int, ref: str, weights: str, record_dir: str, module: str, out: str) -> None:
    """One fit step with FIDCallback(every_n_steps=1); rank 0 writes the metrics to `out`."""
    torch.set_num_threads(1)
    if module == "fake":
        model, data = FakeGenerator(num_classes=4, record_dir=record_dir), dummy_loader()
    else:
        from tests.toy import ToyData, ToyGenerator

        seed_everything(0)  # same initial weights in every run; the EMA (decay 1) keeps them for sampling
        model = ToyGenerator(lr=1e-2, ema_decay=1.0, ema_start_step=-1)
        data = ToyData(n=16, batch_size=4).train_dataloader()
    if strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    fid = FIDCallback(
        reference=ref,
        num_samples=NUM_SAMPLES,
        chunk_size=CHUNK,
        every_n_epochs=None,
        every_n_steps=1,
        inception_weights=weights,
        inception_batch_size=8,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        logger=False,
        callbacks=[fid],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=data)
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps({"metrics": fid.last_metrics, "world": trainer.world_size}))


def run_multiprocess(tmp_path: Path, strategy: str, module: str, ref: str, weights: str) -> dict:
    out, records = tmp_path / f"{strategy}.json", tmp_path / f"records-{strategy}"
    records.mkdir()
    cmd = [sys.executable, "-m", "tests.test_eval_ddp", "--strategy", strategy, "--module", module]
    cmd += ["--ref", ref, "--weights", weights, "--record-dir", str(records), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()) | {"records": records}


def read_calls(record_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (record_dir / f"rank{rank}.jsonl").read_text().splitlines()]


def test_ddp_fid_equals_single_process_and_covers_each_index_once(tmp_path, inception_weights, fast_inception):  # noqa: F811
    ref = tmp_path / "ref.npz"
    make_reference(ref)
    single_records = tmp_path / "records-single"
    single_records.mkdir()
    run("auto", 1, str(ref), inception_weights, str(single_records), "fake", str(tmp_path / "single.json"))
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = run_multiprocess(tmp_path, "ddp", "fake", str(ref), inception_weights)

    assert ddp["world"] == 2 and single["world"] == 1
    assert ddp["metrics"]["fid"] == pytest.approx(single["metrics"]["fid"], rel=1e-5)
    assert ddp["metrics"]["is"] == pytest.approx(single["metrics"]["is"], rel=1e-5)

    plan = SamplePlan(NUM_SAMPLES, 4, CHUNK, seed=0)
    expected = {k: plan.chunk_labels(k).tolist() for k in range(plan.num_chunks)}  # seed k -> labels of chunk k
    calls = [read_calls(ddp["records"], r) for r in (0, 1)]
    assert [len(c) for c in calls] == [3, 3]  # same number of sampling calls on every rank (FSDP2 lockstep)
    assert [c["seed"] for c in calls[0]] == [0, 2, 4] and [c["seed"] for c in calls[1]] == [1, 3, 0]
    for call in calls[0] + calls[1]:
        assert call["labels"] == expected[call["seed"]]
    assert [c["seed"] for c in read_calls(single_records, 0)] == [0, 1, 2, 3, 4]  # chunk 0 only once w/o filler


@pytest.mark.slow
def test_fsdp2_fid_equals_single_process(tmp_path, inception_weights):  # noqa: F811
    """The lead's ToyGenerator (GenerativeModule) with its EMA net sharded by FSDP2: sampling is a collective."""
    ref = tmp_path / "ref.npz"
    make_reference(ref)
    single = run_multiprocess(tmp_path, "single", "toy", str(ref), inception_weights)
    fsdp2 = run_multiprocess(tmp_path, "fsdp2", "toy", str(ref), inception_weights)
    assert fsdp2["world"] == 2
    assert fsdp2["metrics"]["fid"] == pytest.approx(single["metrics"]["fid"], rel=1e-5)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], required=True)
    p.add_argument("--module", choices=["fake", "toy"], default="fake")
    p.add_argument("--ref", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--record-dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    shrink_inception_input()
    strategy, devices = ("auto", 1) if a.strategy == "single" else (a.strategy, 2)
    run(strategy, devices, a.ref, a.weights, a.record_dir, a.module, a.out)


if __name__ == "__main__":
    main()

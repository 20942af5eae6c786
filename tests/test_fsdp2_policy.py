"""FSDP2 mixed precision as torchtitan does it (`FSDP2Strategy` under `precision: bf16-mixed`): on 2 CPU processes
(gloo), parameters are bf16 inside the forward with autocast off, gradients are reduce-scattered in fp32 and kept
in fp32 on the fp32 master parameters, and three steps of training match a fp32 DDP run within bf16 tolerance.

The worker runs as `python -m tests.test_fsdp2_policy --mode policy|autocast|ddp32 --out FILE`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, mode: str, steps: int = 3) -> dict:
    out = tmp_path / f"{mode}.pt"
    cmd = [sys.executable, "-m", "tests.test_fsdp2_policy", "--mode", mode, "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("fsdp2_policy")
    return {mode: run(tmp, mode) for mode in ("policy", "ddp32")}


def test_policy_casts_params_to_bf16_in_forward_without_autocast(runs):
    probe = runs["policy"]["probe"]
    assert set(probe["block_weight_dtype"]) == {"torch.bfloat16"}  # the gathered block weight in forward
    assert set(probe["block_input_dtype"]) == {"torch.bfloat16"}
    assert set(probe["autocast"]) == {False}  # Lightning's autocast is off: nothing is cast twice
    ref = runs["ddp32"]["probe"]
    assert set(ref["block_weight_dtype"]) == {"torch.float32"}  # the probe sees fp32 without the policy


def test_policy_reduces_gradients_in_fp32_onto_fp32_master_params(runs):
    probe = runs["policy"]["probe"]
    assert probe["reduce_scatter_dtypes"] and set(probe["reduce_scatter_dtypes"]) == {"torch.float32"}
    assert set(probe["param_dtypes"]) == {"torch.float32"}  # sharded master parameters
    assert set(probe["grad_dtypes"]) == {"torch.float32"}
    assert probe["reshard_after_forward"] == {"block": True, "root": False}


def test_policy_training_matches_fp32_ddp_within_bf16_tolerance(runs):
    a, b = runs["policy"], runs["ddp32"]
    la, lb = torch.tensor(a["losses"]), torch.tensor(b["losses"])
    assert len(la) == 3
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=2e-3)
    assert not torch.allclose(la, lb, rtol=1e-6, atol=0)  # bf16 compute really happened
    for k, grad in b["first_grads"].items():  # the reduced gradient of step 0: bf16 rounding (2^-8) only
        error = (a["first_grads"][k] - grad).norm() / grad.norm()
        assert error < 2e-2, f"{k}: first-step gradient differs from fp32 DDP by {error:.3g} (relative norm)"
    for k, final in b["state"].items():
        # Adam's update is ~lr * sign(grad): bf16 rounding flips a few near-zero gradients, so compare the whole
        # update by its norm (measured: <= 6% after 3 steps), not element by element
        update_a, update_b = a["state"][k] - b["init"][k], final - b["init"][k]
        error = (update_a - update_b).norm() / update_b.norm()
        assert error < 0.15, f"{k}: update differs from fp32 DDP by {error:.3g} (relative norm)"


# ---------------------------------------------------------------------------------------------------- worker
def worker() -> None:
    import lightning as L
    import torch.distributed as dist

    from lightning_modules.strategies import FSDP2Strategy, shutdown_distributed
    from tests.dist_worker import RecordLoss, SliceData, seeded_slices
    from tests.toy import ToyGenerator, toy_dataset

    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["policy", "autocast", "ddp32"], required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    probe: dict[str, list] = {k: [] for k in ("block_weight_dtype", "block_input_dtype", "autocast")}
    probe.update(reduce_scatter_dtypes=[], param_dtypes=[], grad_dtypes=[])
    original = dist.reduce_scatter_single

    def recording_reduce_scatter(*args, **kwargs):
        probe["reduce_scatter_dtypes"].append(str(kwargs.get("input", args[1] if len(args) > 1 else None).dtype))
        return original(*args, **kwargs)

    dist.reduce_scatter_single = recording_reduce_scatter

    class Probe(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            def hook(block, inputs):
                probe["block_weight_dtype"].append(str(block.weight.dtype))
                probe["block_input_dtype"].append(str(inputs[0].dtype))
                probe["autocast"].append(torch.is_autocast_enabled("cpu"))

            module.net.blocks[0].register_forward_pre_hook(hook)
            options = getattr(trainer.strategy, "fully_shard_kwargs", None)
            if options:
                probe["reshard_after_forward"] = {
                    "block": options(root=False)["reshard_after_forward"],
                    "root": options(root=True)["reshard_after_forward"],
                }

        def on_after_backward(self, trainer, module) -> None:
            if trainer.global_step == 0:
                for name, param in module.net.named_parameters():
                    grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
                    first_grads[name] = grad.detach().float().clone()
            for param in module.net.parameters():
                probe["param_dtypes"].append(str(param.dtype))
                probe["grad_dtypes"].append(str(param.grad.dtype))

    first_grads: dict[str, torch.Tensor] = {}
    torch.manual_seed(0)
    model = seeded_slices(ToyGenerator, slices=2)(lr=1e-2, ema_decay=None, noise_std=0.5)
    init = {k: v.detach().float().clone() for k, v in model.net.state_dict().items()}
    if a.mode == "ddp32":
        strategy, precision = "ddp", "32-true"
    else:
        strategy, precision = FSDP2Strategy(mixed_precision=a.mode == "policy"), "bf16-mixed"
    rec = RecordLoss()
    trainer = L.Trainer(
        max_steps=a.steps,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[rec, Probe()],
    )
    trainer.fit(model, SliceData(toy_dataset(), 8))
    state = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone()
        for k, v in model.net.state_dict().items()
    }
    if trainer.global_rank == 0:
        torch.save(
            {"losses": rec.losses, "state": state, "init": init, "first_grads": first_grads, "probe": probe}, a.out
        )
        print(json.dumps({k: sorted(set(map(str, v))) if isinstance(v, list) else v for k, v in probe.items()}))
    shutdown_distributed()


if __name__ == "__main__":
    worker()

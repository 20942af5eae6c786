"""bf16 precision plugins: attention stays fp32 on CPU, gradient clipping works with fused AdamW, and
AutoBF16Precision trains in whichever precision its timed probe steps found faster (every rank in rank 0's)."""

from __future__ import annotations

import os
import socket
import time

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from ardiff.cli import main
from lightning_modules.precision import AutoBF16Precision, BF16Precision
from models.transdiff import TRANSDIFF_CONFIGS, TransDiff
from tests.test_cli import ROOT, ardiff_inprocess
from tests.test_demo import shortened


class KernelDtypes(TorchDispatchMode):
    """Records the dtype of the first argument of every aten kernel whose name contains one of `names`."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names, self.seen = names, {n: set() for n in names}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for n in self.names:
            if n in func.name():
                self.seen[n].add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_attention_runs_in_fp32_on_cpu_and_linear_layers_in_bf16():
    torch.manual_seed(0)
    net = TransDiff(TRANSDIFF_CONFIGS["tiny"])
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    plugin = BF16Precision("cpu")
    spy = KernelDtypes("scaled_dot_product", "addmm")
    with spy:
        with plugin.forward_context():
            loss = net(x, y)
        loss.backward()
    assert spy.seen["addmm"] == {torch.bfloat16}  # autocast is on for the linear layers
    assert spy.seen["scaled_dot_product"] == {torch.float32}  # forward and backward attention kernels
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters() if p.requires_grad)

    # the value: fp32 attention of the bf16 inputs, rounded to bf16 (a float mask is cast up with them)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.randn(16, 16, dtype=torch.bfloat16)
    with plugin.forward_context():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_clips_gradients_of_a_fused_adamw():
    layer = nn.Linear(4, 4)
    for p in layer.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt = torch.optim.AdamW(layer.parameters(), fused=True)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):  # why ardiff replaces it
        MixedPrecision("bf16-mixed", "cpu").clip_gradients(opt, clip_val=1.0)
    BF16Precision("cpu").clip_gradients(opt, clip_val=1.0)
    n = sum(p.numel() for p in layer.parameters())  # 20 entries of 3.0: norm 3 * sqrt(20), scaled down to 1
    for p in layer.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 1.0 / n**0.5), rtol=1e-5, atol=1e-6)


def test_ardiff_fit_in_bf16_mixed_with_gradient_clipping(tmp_path, demo_root):
    """The GPU recipes say `precision: bf16-mixed` and clip gradients; Lightning's own plugin refuses that with the
    fused AdamW (RuntimeError at the first step). Here on CPU, through the real command."""
    cfg_path = shortened("transdiff/demo.yaml", tmp_path, demo_root, max_steps=2)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"].pop("plugins", None)
    cfg["trainer"].update(precision="bf16-mixed", callbacks=[])
    assert cfg["trainer"]["gradient_clip_val"] > 0
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "-c", str(cfg_path)]) == 0


class Timed(L.LightningModule):
    """Its training step sleeps `slow` s in the slow precision and `fast` s in the other; it records which it ran."""

    def __init__(self, slow_in_bf16: bool, slow: float = 0.05, fast: float = 0.005) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.slow_in_bf16, self.slow, self.fast = slow_in_bf16, slow, fast
        self.ran_bf16: list[bool] = []

    def training_step(self, batch, batch_idx):
        bf16 = torch.is_autocast_enabled("cpu")
        self.ran_bf16.append(bf16)
        time.sleep(self.slow if bf16 == self.slow_in_bf16 else self.fast)
        return self.layer(batch).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 8), batch_size=4)


def fit(module: Timed, steps: int, root, ckpt_path=None) -> AutoBF16Precision:
    plugin = AutoBF16Precision(probe_steps=3)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, plugins=[plugin], logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    trainer.save_checkpoint(os.path.join(root, "last.ckpt"))
    return plugin


@pytest.mark.parametrize("slow_in_bf16", [False, True])
def test_auto_bf16_trains_in_the_precision_that_measured_faster(tmp_path, slow_in_bf16):
    module = Timed(slow_in_bf16)
    plugin = fit(module, 12, tmp_path)
    probe = [False, True] * 4  # a warm-up step each, then 3 timed steps each, alternating
    assert module.ran_bf16[:8] == probe
    assert module.ran_bf16[8:] == [not slow_in_bf16] * 4
    assert plugin.use_bf16 is (not slow_in_bf16)
    assert (plugin.speedup > 3) is (not slow_in_bf16) and (plugin.speedup < 1 / 3) is slow_in_bf16  # ~10x either way

    # resumed: the stored choice holds from the first step, no new probe
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["AutoBF16Precision"]["use_bf16"] is (not slow_in_bf16)
    resumed = Timed(slow_in_bf16=not slow_in_bf16)  # would measure the other way now
    fit(resumed, 16, tmp_path / "r", ckpt_path=tmp_path / "last.ckpt")
    assert resumed.ran_bf16 == [not slow_in_bf16] * 4


def test_auto_bf16_resumed_mid_probe_goes_on_with_the_same_sequence(tmp_path):
    """A run stopped during the probe (step 5 of 8) and resumed runs steps 5-7 in the precisions the uninterrupted
    run used there, then decides from all 6 timings: the precision of every step, and so the weights, match."""
    straight = Timed(slow_in_bf16=False)
    fit(straight, 12, tmp_path / "straight")
    first = Timed(slow_in_bf16=False)
    fit(first, 5, tmp_path)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["AutoBF16Precision"]
    assert state["use_bf16"] is None and state["probe_step"] == 5
    assert len(state["probe_times_fp32"]) == 2 and len(state["probe_times_bf16"]) == 1  # steps 2, 4 (just ended) and 3
    resumed = Timed(slow_in_bf16=False)
    plugin = fit(resumed, 12, tmp_path / "r", ckpt_path=tmp_path / "last.ckpt")
    assert first.ran_bf16 + resumed.ran_bf16 == straight.ran_bf16 == [False, True] * 4 + [True] * 4
    assert plugin.use_bf16 is True and plugin.speedup > 3


def _decide_on_rank(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    plugin = AutoBF16Precision()
    plugin._times = {False: [1.0] * 3, True: [0.5 if rank == 0 else 2.0] * 3}  # rank 0: bf16 2x faster; rank 1: slower
    plugin._decide()
    torch.save({"use_bf16": plugin.use_bf16, "speedup": plugin.speedup}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_auto_bf16_every_rank_takes_rank_zeros_choice(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_decide_on_rank, args=(port, str(tmp_path / "d")), nprocs=2)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"d.{rank}") == {"use_bf16": True, "speedup": 2.0}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp2_cpu"])
def test_strategy_presets_replace_a_recipes_precision_plugin(strategy):
    """Lightning refuses `precision` beside a precision plugin: a strategy preset composed after a demo recipe (as
    README shows for fsdp2_cpu) drops the recipe's AutoBF16Precision for its own precision."""
    recipe = ROOT / "experiments/transdiff/demo.yaml"
    assert yaml.safe_load(recipe.read_text())["trainer"]["plugins"]
    proc = ardiff_inprocess(
        "fit", "--print_config", "-c", str(recipe), "-c", f"{ROOT}/experiments/strategies/{strategy}.yaml"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = yaml.safe_load(proc.stdout)["trainer"]
    assert trainer["plugins"] is None and trainer["precision"] in ("32-true", "bf16-mixed")

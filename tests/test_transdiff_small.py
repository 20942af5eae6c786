"""Small TransDiff recipes: the encoder lr that keeps c class-dependent, the class count read from the shards,
and the flip switch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.demo import render_shape_image
from datamodules.folder import ShardFolderDataModule, read_num_classes
from datamodules.shards import write_shards
from lightning_modules.transdiff import TransDiffModule

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "experiments" / "transdiff" / name).read_text())["model"]["init_args"]


@torch.no_grad()
def class_variance(net) -> float:
    """Variance of the encoder output c across the classes (eval mode), averaged over tokens and channels."""
    was = net.training
    net.eval()
    c = net.forward_encoder(net.class_emb(torch.arange(net.cfg.num_classes)))  # (K, T, D)
    net.train(was)
    return c.var(0).mean().item()


def _train_encoder_steps(encoder_lr_scale: float, steps: int = 20) -> float:
    """Ratio var_cls(after `steps` demo-recipe steps) / var_cls(init) on the demo shapes (batch 32)."""
    args = _recipe("demo.yaml")
    torch.manual_seed(0)
    module = TransDiffModule(
        arch=args["arch"], vae=args["vae"], lr=args["lr"], warmup_steps=args["warmup_steps"],
        lr_schedule=args["lr_schedule"], min_lr=args["min_lr"], total_steps=300, ema_decay=None,
        encoder_lr_scale=encoder_lr_scale,
    )  # fmt: skip
    opt = module.configure_optimizers()
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=steps * 32)
    images = np.stack(
        [render_shape_image(int(c), 10, 32, np.random.default_rng([7, i]), 1) for i, c in enumerate(labels)]
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32)
    y = torch.from_numpy(labels).long()
    start = class_variance(module.net)
    for s in range(steps):
        loss = module.net(x[s * 32 : (s + 1) * 32], y[s * 32 : (s + 1) * 32])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.parameters(), 3.0)
        optimizer.step()
        sched.step()
    return class_variance(module.net) / start


def test_demo_encoder_lr_keeps_class_information_in_c():
    """The cause of the class-blind demo: at the full lr the encoder's first updates make its output c one vector
    common to all classes (variance across classes / 16 in 20 steps, then / 1000). The demo recipe's encoder lr
    scale keeps it; the full lr (encoder_lr_scale 1, the planted cause) loses it."""
    assert _recipe("demo.yaml")["encoder_lr_scale"] <= 0.2
    kept = _train_encoder_steps(_recipe("demo.yaml")["encoder_lr_scale"])
    collapsed = _train_encoder_steps(1.0)
    assert kept > 0.4, kept
    assert collapsed < 0.2, collapsed


def test_encoder_lr_scale_zero_freezes_the_encoder_exactly():
    """The own-data recipe freezes the encoder (encoder_lr_scale 0): after optimiser steps every encoder tensor is
    bit-identical (no update, no weight decay) while the decoder trains."""
    assert _recipe("small.yaml")["encoder_lr_scale"] == 0.0
    torch.manual_seed(0)
    module = TransDiffModule(arch="tiny", vae="identity", lr=1e-3, encoder_lr_scale=0.0, warmup_steps=0,
                             total_steps=10)  # fmt: skip
    optimizer = module.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    for _ in range(3):
        loss = module.net(torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = module.net.state_dict()
    for k, v in before.items():
        if k.startswith("diffdecoder."):
            continue
        assert torch.equal(after[k], v), k
    assert not torch.equal(after["diffdecoder.net.input_proj.weight"], before["diffdecoder.net.input_proj.weight"])


def test_encoder_lr_scale_groups():
    module = TransDiffModule(arch="tiny", vae="identity", lr=1e-3, encoder_lr_scale=0.1, total_steps=10)
    opt = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in module.net.named_parameters():
        if not p.requires_grad:
            continue
        assert lr_of[id(p)] == pytest.approx(1e-3 if name.startswith("diffdecoder.") else 1e-4), name
        assert wd_of[id(p)] == (0.0 if module.no_weight_decay(name, p) else 0.02), name
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged reference lr


def _image_folder(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.zeros((32, 32, 3), np.uint8)
            arr[:, :16] = 40 * c  # left half coloured: a horizontal flip is visible
            Image.fromarray(arr).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_small_recipe_reads_class_count_from_shards(tmp_path):
    write_shards(_image_folder(tmp_path / "imgs", 3, 4), tmp_path / "shards", maxcount=5, workers=0, progress=False)
    assert read_num_classes(str(tmp_path / "shards")) == 3
    recipe = yaml.safe_load((ROOT / "experiments" / "transdiff" / "small.yaml").read_text())
    assert recipe["data"]["class_path"].endswith("ShardFolderDataModule")
    data_args = {k: v for k, v in recipe["data"]["init_args"].items() if k != "shards"}
    dm = ShardFolderDataModule(shards=str(tmp_path / "shards"), **data_args)
    assert dm.num_classes == 3 and dm.val_shards == str(tmp_path / "shards") and dm.flip is False
    model_args = recipe["model"]["init_args"]
    assert model_args["num_classes"] == "data" and model_args["image_size"] == "data"
    module = TransDiffModule(**model_args)
    assert module.net.class_emb.num_embeddings != 3
    module._trainer = SimpleNamespace(datamodule=dm, ckpt_path=None)
    module.setup("fit")
    assert module.num_classes == 3 and module.hparams["num_classes"] == 3
    assert module.net.class_emb.num_embeddings == 3
    module = TransDiffModule(**{**model_args, "ema_decay": 0.99})
    module._trainer = SimpleNamespace(datamodule=dm, ckpt_path=None)
    module.setup("fit")
    assert module.ema_net.class_emb.num_embeddings == 3


def test_missing_class_index_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class_index\.json.*num_classes"):
        ShardFolderDataModule(shards=str(tmp_path / "s"))


def test_flip_off_and_validation_never_flipped(tmp_path):
    write_shards(_image_folder(tmp_path / "imgs", 2, 8), tmp_path / "shards", maxcount=8, workers=0, progress=False)

    def left_brighter(loader) -> list[bool]:
        out = []
        for batch in loader:
            img = batch["image"]  # (B, 3, H, W)
            out += (img[..., :16].mean((1, 2, 3)) >= img[..., 16:].mean((1, 2, 3))).tolist()
        return out

    for flip in (True, False):
        dm = ShardFolderDataModule(shards=str(tmp_path / "shards"), image_size=32, batch_size=4, num_workers=0,
                                   flip=flip)  # fmt: skip
        dm.setup("fit")
        train = left_brighter(dm.train_dataloader())
        assert all(left_brighter(dm.val_dataloader()))  # validation: never mirrored
        assert all(train) is (not flip)  # flip=True mirrors some of 16 training images, flip=False none


# ------------------------------------------------------------------ opt-in ConvFFN of the tiny decoder
def test_conv_mlp_matches_a_hand_written_neighbour_sum():
    """ConvMlp = fc2(GELU(h + dwconv(h))), h = fc1(x), the conv a 3x3 neighbour sum on the token grid (zero pad)."""
    from models.transdiff import ConvMlp

    torch.manual_seed(0)
    mlp = ConvMlp(dim=4, hidden=8, drop=0.0)
    x = torch.randn(2, 9, 4)  # 3 x 3 token grid
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias  # (2, 9, 8)
    k, b = mlp.dwconv.weight[:, 0], mlp.dwconv.bias  # (8, 3, 3), (8,)
    conv = torch.zeros_like(h)
    for n in range(9):
        r, c = divmod(n, 3)
        conv[:, n] = b
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if 0 <= r + dr < 3 and 0 <= c + dc < 3:
                    conv[:, n] += k[:, dr + 1, dc + 1] * h[:, (r + dr) * 3 + (c + dc)]
    g = h + conv
    want = torch.nn.functional.gelu(g) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", [False, True])
def test_decoder_mlp_mixes_exactly_the_3x3_neighbourhood(conv):
    """The official MLP is token-local; with decoder_conv_mlp, a token's MLP output depends on its 3x3 neighbours
    and on no other token. The official layout keeps its keys (no dwconv) when the option is off."""
    from dataclasses import replace

    from models.transdiff import TRANSDIFF_CONFIGS, TransDiff

    cfg = replace(TRANSDIFF_CONFIGS["tiny"], decoder_conv_mlp=conv)
    net = TransDiff(cfg)
    assert any("dwconv" in k for k in net.state_dict()) == conv
    mlp = net.diffdecoder.net.res_blocks[0].mlp
    x = torch.randn(1, 64, 128, requires_grad=True)  # 8 x 8 decoder tokens
    (grad,) = torch.autograd.grad(mlp(x)[0, 27].sum(), x)  # token 27 = (row 3, col 3)
    touched = {n for n in range(64) if grad[0, n].abs().sum() > 0}
    want = {(3 + dr) * 8 + 3 + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)} if conv else {27}
    assert touched == want


@pytest.mark.parametrize("sincos", [False, True])
def test_decoder_sincos_pos_is_a_2d_table_in_token_order(sincos):
    """Opt-in decoder_sincos_pos: the decoder position embedding starts as a 2D sin-cos table over the 8 x 8 token
    grid (row-major, as patchify orders the tokens); off, it keeps the official N(0, 0.02) start. Checked by
    properties of any 2D sin-cos table: each entry is sin or cos of (row or column) * frequency, so the dot product of
    two positions depends only on their offset, and it is the same for a step along a row as down a column."""
    from dataclasses import replace

    from models.transdiff import TRANSDIFF_CONFIGS, TransDiff

    torch.manual_seed(0)
    param = TransDiff(replace(TRANSDIFF_CONFIGS["tiny"], decoder_sincos_pos=sincos)).diffdecoder.net
    param = param.diffusion_pos_embed_learned
    assert param.requires_grad  # a start, not a fixed table: it is still learnt
    pos = param.detach()[0]  # (64, 128)
    assert pos.shape == (64, 128)
    if not sincos:
        assert pos.std().item() == pytest.approx(0.02, rel=0.1)
        return
    assert pos.abs().max().item() <= 1.0 and pos.std().item() > 0.3
    assert torch.allclose((pos**2).sum(1), torch.full((64,), 64.0), atol=1e-4)  # sin^2 + cos^2 = 1, 64 pairs
    dot = pos @ pos.T  # (64, 64)
    right = torch.stack([dot[r * 8 + c, r * 8 + c + 1] for r in range(8) for c in range(7)])
    down = torch.stack([dot[r * 8 + c, (r + 1) * 8 + c] for r in range(7) for c in range(8)])
    assert torch.allclose(right, right[0].expand_as(right), atol=1e-4)  # offset-only: same for every pair
    assert torch.allclose(down, right[0].expand_as(down), atol=1e-4)  # a row step equals a column step
    wrap = dot[7, 8]  # (row 0, col 7) and (row 1, col 0): 7 columns and a row apart, not neighbours
    assert wrap < right[0] - 1.0


class _ConstantNet(torch.nn.Module):
    """Stands in for the velocity network: returns a fixed tensor whatever the input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, c, t):
        return self.out.expand_as(x)


def test_x_prediction_velocity_and_loss_match_hand_computed_values():
    """decoder_prediction="x": the network's output is read as x0, so v = (x_t - x0_hat) / max(t, t_min). A network
    that outputs the true x0 has zero loss at every t >= t_min; one that outputs 0 has loss mean((x0 / t)^2) (the
    path x_t = (1 - t) x0 + t eps), and below t_min the division uses t_min; "v" reads the output as v itself."""
    from models.transdiff import TRANSDIFF_CONFIGS, DiffDecoder

    cfg = replace(TRANSDIFF_CONFIGS["tiny"], decoder_prediction="x", x_pred_t_min=0.05)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 64, 48, generator=g), torch.randn(2, 64, 48, generator=g)
    dec = DiffDecoder(cfg)
    c = torch.zeros(2, 16, 128)
    steps = torch.tensor([500, 250])
    dec.net = _ConstantNet(x0)
    assert dec.loss(x0, c, noise=eps, timesteps=steps).item() == pytest.approx(0.0, abs=1e-10)
    dec.net = _ConstantNet(torch.zeros(()))
    expected = torch.cat([(x0[0] / 0.5) ** 2, (x0[1] / 0.25) ** 2]).mean()  # by hand: v_hat - v = x0 / t
    assert dec.loss(x0, c, noise=eps, timesteps=steps).item() == pytest.approx(expected.item(), rel=1e-5)
    low = torch.tensor([10, 10])  # t = 0.01 < t_min: v_hat = x_t / 0.05
    x_t = 0.99 * x0 + 0.01 * eps
    expected = ((x_t / 0.05 - (eps - x0)) ** 2).mean()
    assert dec.loss(x0, c, noise=eps, timesteps=low).item() == pytest.approx(expected.item(), rel=1e-5)
    assert TRANSDIFF_CONFIGS["tiny"].decoder_prediction == "x"  # the demo preset; the official sizes keep "v"
    assert TRANSDIFF_CONFIGS["transdiff_large"].decoder_prediction == "v"
    official = DiffDecoder(replace(cfg, decoder_prediction="v"))  # "v": the output is the velocity
    official.net = _ConstantNet(eps - x0)
    assert official.loss(x0, c, noise=eps, timesteps=steps).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="decoder_prediction"):
        DiffDecoder(replace(cfg, decoder_prediction="eps"))

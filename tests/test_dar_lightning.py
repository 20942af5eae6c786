"""D-AR Lightning modules: LPIPS / DINOv2 weight loading, both training stages end to end on tiny configs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.dar import DARGPTModule, DARTokenizerModule, load_tokenizer_checkpoint
from models.perceptual import load_dinov2, load_lpips

torch.set_num_threads(1)

VGG16_FEATURE_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
                       14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
                       26: (512, 512), 28: (512, 512)}  # fmt: skip


@pytest.fixture(scope="module")
def loss_weight_files(tmp_path_factory):
    """Random weights under the real key names: torchvision vgg16, LPIPS vgg.pth, a 1-block DINOv2 hub file."""
    d = tmp_path_factory.mktemp("weights")
    vgg = {}
    for i, (o, c) in VGG16_FEATURE_CONVS.items():
        vgg[f"features.{i}.weight"] = torch.randn(o, c, 3, 3) * (2 / (9 * c)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.zeros(o)
    vgg["classifier.0.weight"] = torch.zeros(1, 1)  # the classifier is ignored
    torch.save(vgg, d / "vgg16.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, d / "vgg.pth")
    c = 64
    dino = {
        "cls_token": torch.randn(1, 1, c),
        "pos_embed": torch.randn(1, 1 + 37 * 37, c),
        "mask_token": torch.zeros(1, c),
    }
    dino.update({"patch_embed.proj.weight": torch.randn(c, 3, 14, 14) * 0.02, "patch_embed.proj.bias": torch.zeros(c)})
    blk = {"norm1.weight": (c,), "norm1.bias": (c,), "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
           "attn.proj.weight": (c, c), "attn.proj.bias": (c,), "ls1.gamma": (c,), "norm2.weight": (c,),
           "norm2.bias": (c,), "mlp.fc1.weight": (4 * c, c), "mlp.fc1.bias": (4 * c,), "mlp.fc2.weight": (c, 4 * c),
           "mlp.fc2.bias": (c,), "ls2.gamma": (c,)}  # fmt: skip
    dino.update({f"blocks.0.{k}": torch.randn(s) * 0.02 for k, s in blk.items()})
    dino.update({"norm.weight": torch.ones(c), "norm.bias": torch.zeros(c)})
    torch.save(dino, d / "dinov2.pth")
    return d


def test_lpips_loading_and_metric(loss_weight_files, monkeypatch, tmp_path):
    d = loss_weight_files
    lpips = load_lpips(str(d / "vgg16.pth"), str(d / "vgg.pth"))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    dist = lpips(x, y)
    assert dist.shape == (2,) and (dist > 0).all()
    assert torch.equal(lpips.lin2.model[1].weight, torch.load(d / "vgg.pth")["lin2.model.1.weight"])
    monkeypatch.setenv("ARDIFF_VGG16_PATH", str(d / "vgg16.pth"))  # env var route
    monkeypatch.setenv("ARDIFF_LPIPS_PATH", str(d / "vgg.pth"))
    assert torch.allclose(load_lpips()(x, y), dist)
    monkeypatch.delenv("ARDIFF_VGG16_PATH")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache
    with pytest.raises(FileNotFoundError, match="lpips_vgg_path"):
        load_lpips()


def test_dinov2_loading(loss_weight_files, monkeypatch, tmp_path):
    model = load_dinov2(str(loss_weight_files / "dinov2.pth"), embed_dim=64, depth=1, num_heads=2)
    feats = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert feats.shape == (2, 256, 64) and torch.isfinite(feats).all()
    assert model.vit.pos_embed.shape == (1, 257, 64)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ARDIFF_DINOV2_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="repa_weights_path"):
        load_dinov2()


def image_batches(n: int, batch: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1,
            "label": torch.randint(0, 10, (batch,), generator=g),
        }
        for _ in range(n)
    ]


def fit(module: L.LightningModule, batches: list[dict], steps: int) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def test_tokenizer_module_losses_with_lpips_and_repa(loss_weight_files):
    d = loss_weight_files
    module = DARTokenizerModule(
        config="tiny", lpips_vgg_path=str(d / "vgg16.pth"), lpips_lin_path=str(d / "vgg.pth"),
        repa_weights_path=str(d / "dinov2.pth"),
    )  # fmt: skip
    module.loss_nets["repa"] = load_dinov2(str(d / "dinov2.pth"), embed_dim=64, depth=1, num_heads=2)  # tiny arch
    loss, logs = module.compute_loss(image_batches(1)[0])
    parts = logs["fm_loss"] + logs["vq_loss"] + logs["commit_loss"] + 0.5 * logs["lpips"] + 0.5 * logs["repa"]
    assert torch.isfinite(loss) and torch.allclose(loss, parts)
    loss.backward()
    assert module.net.diff_decoder.net.repa_out[0].weight.grad.abs().sum() > 0  # REPA trains the projector
    assert "loss_nets" not in str(list(module.state_dict())[:5]) and not any("lpips" in k for k in module.state_dict())


def test_lpips_dropout_is_active_in_training_only(loss_weight_files):
    """Official tokenizer training calls vq_loss.train(): LPIPS's lin-layer Dropout(p=0.5) is on during training."""
    d = loss_weight_files
    module = DARTokenizerModule(config="tiny", lpips_vgg_path=str(d / "vgg16.pth"), lpips_lin_path=str(d / "vgg.pth"),
                                repa_weight=0.0)  # fmt: skip
    lpips = module.loss_net("lpips")
    assert all(m.p == 0.5 for m in lpips.modules() if isinstance(m, torch.nn.Dropout))
    modes = []
    lpips.register_forward_pre_hook(lambda m, args: modes.append(m.lin0.model[0].training))
    batch = image_batches(1)[0]
    module.train().compute_loss(batch)
    module.eval().compute_loss(batch)
    assert modes == [True, False]


def test_two_stage_training_and_sampling(tmp_path):
    tok_module = DARTokenizerModule(config="tiny", lpips_weight=0, repa_weight=0, recon_every_n_steps=0)
    before = tok_module.net.quant_in_conv.weight.clone()
    trainer = fit(tok_module, image_batches(3), steps=3)
    assert not torch.equal(before, tok_module.net.quant_in_conv.weight)
    rows = tok_module.reconstruction_rows(image_batches(1)[0]["image"][:2], torch.Generator().manual_seed(0))
    assert rows.shape == (10, 3, 32, 32) and torch.isfinite(rows).all()
    ckpt = tmp_path / "tokenizer.ckpt"
    trainer.save_checkpoint(ckpt)

    tok = load_tokenizer_checkpoint(str(ckpt))  # EMA weights of the Lightning checkpoint
    assert tok.cfg.num_tokens == 32
    for k, v in tok.state_dict().items():
        assert torch.equal(v, tok_module.ema_net.state_dict()[k])

    gpt_module = DARGPTModule(gpt="tiny", tokenizer_path=str(ckpt), cfg_start=1.1, cfg_end=4.0, warmup_steps=1,
                              decay_start_step=1, total_steps=3)  # fmt: skip
    loss, logs = gpt_module.compute_loss(image_batches(1)[0])
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1  # zero-init head
    assert 0 <= logs["token_acc"] <= 1
    fit(gpt_module, image_batches(3) + [{"tokens": torch.randint(0, 256, (4, 32)), "label": torch.arange(4)}], steps=4)
    assert gpt_module.image_size == 32 and not any(k.startswith("_tokenizer") for k in gpt_module.state_dict())
    labels = torch.tensor([0, 3])
    a = gpt_module.sample_images(labels, torch.Generator().manual_seed(5))
    b = gpt_module.sample_images(labels, torch.Generator().manual_seed(5))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert tok_module.sample_images(labels, torch.Generator().manual_seed(0)).shape == (2, 3, 32, 32)

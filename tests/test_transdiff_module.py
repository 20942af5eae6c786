"""TransDiffModule: image / moments / MRAR-group losses, weight-decay rule, sampling interface, a short fit."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.transdiff import TransDiffModule, group_same_class
from models.transdiff import TransDiff


def module(**kwargs) -> TransDiffModule:
    torch.manual_seed(0)
    return TransDiffModule(**{"arch": "tiny", "vae": "identity", "num_steps": 3, "cfg": 1.5, **kwargs})


def test_loss_from_images_and_from_cached_moments():
    m = module()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    loss, _ = m.compute_loss({"image": images, "label": labels})
    moments = torch.cat([images, torch.full_like(images, -30.0)], dim=1)  # (B, 2C, h, w): a point posterior
    loss_m, _ = m.compute_loss({"moments": moments, "label": labels})
    assert torch.isfinite(loss) and torch.isfinite(loss_m) and loss.item() > 0.5  # ~E|eps - x0|^2 at init


def test_mrar_groups_from_a_flat_batch():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    x = torch.arange(11).float()[:, None]  # each sample is its own index
    groups, group_labels = group_same_class(x, labels, 4, torch.Generator().manual_seed(0))
    idx = groups.squeeze(-1).long()  # (G, 4)
    assert idx.shape == (9, 4)  # classes 0 and 2 have >= 4 samples; class 1 is dropped
    assert sorted(idx[:, -1].tolist()) == [0, 1, 2, 3, 6, 7, 8, 9, 10]  # every sample is a target once
    for row, c in zip(idx, group_labels, strict=True):
        assert len(set(row.tolist())) == 4 and (labels[row] == c).all()
    with pytest.raises(ValueError, match="4 images of one class"):
        group_same_class(x[4:6], labels[4:6], 4)


def test_mrar_loss_from_grouped_and_flat_batches():
    m = module(arch="tiny_mrar")
    grouped = {"image": torch.rand(2, 4, 3, 32, 32) * 2 - 1, "label": torch.tensor([1, 2])}
    flat = {"image": torch.rand(8, 3, 32, 32) * 2 - 1, "label": torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])}
    assert torch.isfinite(m.compute_loss(grouped)[0]) and torch.isfinite(m.compute_loss(flat)[0])


def test_official_weight_decay_rule():
    m = module()
    decayed = {n for n, p in m.net.named_parameters() if not m.no_weight_decay(n, p)}
    assert "encoder_blocks.0.attn.qkv.weight" in decayed and "class_emb.weight" in decayed
    assert "encoder_pos_embed_learned" in decayed
    assert not any("diffdecoder" in n for n in decayed)  # the whole decoder is excluded
    assert "encoder_blocks.0.attn.qkv.bias" not in decayed and "encoder_norm.weight" not in decayed


def test_vae_is_kept_out_of_the_checkpoint_and_missing_weights_fail_early(tmp_path):
    m = module()
    m.vae  # noqa: B018
    assert all(k.startswith(("net.", "ema_net.")) for k in m.state_dict())
    with pytest.raises(FileNotFoundError, match="kl16"):
        module(vae="kl16", vae_path=str(tmp_path / "missing.ckpt")).setup("fit")


def test_sample_images_contract(monkeypatch):
    """sample_images = vae.decode(EMA-net latents / scale_factor), clamped; constructor sampling settings."""
    m = module()
    torch.nn.init.normal_(m.ema_net.diffdecoder.net.final_layer.linear.weight, std=0.05)
    latents = torch.linspace(-3, 3, 2 * 3 * 32 * 32).view(2, 3, 32, 32)  # known sampler output
    calls = []

    def fake_sample(self, labels, **kwargs):
        calls.append((self, self.training, labels, kwargs))
        return latents

    class HalfScaleVAE(torch.nn.Module):  # decode(z) = z + 1, scale 0.5: both must be applied
        scale_factor = 0.5

        def decode(self, z):
            return z + 1

    m._vae[:] = [HalfScaleVAE()]
    monkeypatch.setattr(TransDiff, "sample", fake_sample)
    labels, g = torch.tensor([0, 3]), torch.Generator()
    out = m.sample_images(labels, generator=g)
    assert torch.equal(out, (latents / 0.5 + 1).clamp(-1, 1))
    net, training, seen_labels, kwargs = calls[0]
    assert net is m.ema_net and not training and m.ema_net.training  # EMA copy, in eval mode only while sampling
    assert torch.equal(seen_labels, labels)
    assert kwargs == {"generator": g, "num_steps": 3, "cfg": 1.5, "scale_0": 1.0, "scale_1": 1.0}
    m.sample_images(labels, cfg=1.0, num_steps=2)
    assert calls[1][3]["cfg"] == 1.0 and calls[1][3]["num_steps"] == 2


def test_short_fit_updates_weights_and_ema():
    m = module(lr=1e-3, ema_decay=0.5)
    data = [{"image": torch.rand(3, 32, 32) * 2 - 1, "label": torch.tensor(i % 10)} for i in range(8)]
    before = m.net.class_emb.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=3.0,
    )  # fmt: skip
    trainer.fit(m, DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    assert not torch.equal(m.net.class_emb.weight, before)
    assert not torch.equal(m.ema_net.class_emb.weight, m.net.class_emb.weight)
    assert not m.net.z_proj.weight.requires_grad

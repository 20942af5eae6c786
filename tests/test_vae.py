"""KL-16 VAE: official key layout, shapes, loading errors, and the pixel-space stand-in."""

import pytest
import torch

from models.checkpoint import CheckpointError
from models.vae import KL16VAE, IdentityAutoencoder, VAEConfig, load_kl16


def kl16_layout() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of MAR's kl16.ckpt `model` dict, written out from LDM's AutoencoderKL(ch=128,
    ch_mult=(1,1,2,2,4), num_res_blocks=2, z_channels=16, attn at 16 px in the encoder only)."""
    sd: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    chans = [128, 128, 256, 256, 512]
    conv("encoder.conv_in", 3, 128, 3)
    cin = 128
    for i, c in enumerate(chans):
        for j in range(2):
            res(f"encoder.down.{i}.block.{j}", cin if j == 0 else c, c)
            if i == 4:
                attn(f"encoder.down.{i}.attn.{j}", c)
        if i < 4:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
        cin = c
    for part in ("encoder", "decoder"):
        res(f"{part}.mid.block_1", 512, 512), attn(f"{part}.mid.attn_1", 512), res(f"{part}.mid.block_2", 512, 512)
    norm("encoder.norm_out", 512), conv("encoder.conv_out", 512, 32, 3)
    conv("decoder.conv_in", 16, 512, 3)
    cin = 512
    for i in reversed(range(5)):
        for j in range(3):
            res(f"decoder.up.{i}.block.{j}", cin if j == 0 else chans[i], chans[i])
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", chans[i], chans[i], 3)
        cin = chans[i]
    norm("decoder.norm_out", 128), conv("decoder.conv_out", 128, 3, 3)
    conv("quant_conv", 32, 32, 1), conv("post_quant_conv", 16, 16, 1)
    return sd


def test_kl16_key_layout_matches_official():
    with torch.device("meta"):
        vae = KL16VAE()
    own = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert own == kl16_layout()
    assert sum(v.numel() for v in vae.state_dict().values()) == 66_456_019  # ~266 MB fp32, the size of kl16.ckpt


def test_load_kl16_from_file_drops_loss_keys(tmp_path, monkeypatch):
    sd = {k: torch.randn(shape) * 0.01 for k, shape in kl16_layout().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)  # LDM loss weights are tolerated
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, path)
    monkeypatch.setenv("ARDIFF_KL16", str(path))
    vae = load_kl16()  # path from the environment
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert torch.equal(vae.quant_conv.weight, sd["quant_conv.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert vae.encode_moments(x).shape == (1, 32, 2, 2)

    del sd["decoder.conv_out.bias"]
    sd["decoder.conv_out.weight"] = torch.zeros(3, 64, 3, 3)
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"(?s)missing.*decoder\.conv_out\.bias.*shape mismatch"):
        load_kl16(path)


def test_load_kl16_missing_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ARDIFF_KL16", raising=False)
    with pytest.raises(FileNotFoundError, match=r"(?s)kl16\.ckpt.*dropbox.*ARDIFF_KL16"):
        load_kl16()
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_kl16(tmp_path / "nope.ckpt")


def test_tiny_vae_roundtrip_shapes_and_range():
    torch.manual_seed(0)
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, embed_dim=4, encoder_attn_resolutions=(16,), resolution=32)
    vae = KL16VAE(cfg).eval()
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == (2, 4, 16, 16)
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert torch.equal(post.sample(g1), post.sample(g2))  # sampling draws only from the generator
        y = vae.decode(post.sample(torch.Generator().manual_seed(0)))
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.abs().max() < 20


def test_identity_autoencoder_is_pixel_space():
    ae = IdentityAutoencoder()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z = ae.encode(x).sample(torch.Generator().manual_seed(0))
    assert torch.allclose(z, x, atol=1e-5) and ae.scale_factor == 1.0
    assert torch.equal(ae.decode(x), x)

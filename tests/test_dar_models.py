"""D-AR tokenizer and GPT: sizes, official key layouts, safe loading, KV-cache sampling, streaming decode."""

from __future__ import annotations

import pickle
import sys
import types

import pytest
import torch

from models.checkpoint import CheckpointError, load_state_dict_strict
from models.dar_gpt import (
    DAR_GPT_CONFIGS,
    DARGPT,
    KVCache,
    cfg_schedule,
    iter_tokens,
    load_dar_gpt,
    sample_tokens,
    sample_with_layout,
)
from models.dar_tokenizer import DAR_TOKENIZER_CONFIGS, DARTokenizer, load_dar_tokenizer

torch.set_num_threads(2)


# ---------------------------------------------------------------------------- official layouts, written out
def official_tokenizer_shapes(
    d=768, enc_layers=8, dec_layers=8, depth=12, patch=16, dec_patch=8, vq=8, codebook=16384, table=1024, rank=8
) -> dict[str, tuple]:
    """showlab/D-AR `VQModel` state_dict (tokenizer_v1.yaml values by default), from its module structure."""
    shapes: dict[str, tuple] = {}

    def attention(prefix):
        for n in ("q", "k", "v", "proj"):
            shapes[f"{prefix}.{n}.weight"], shapes[f"{prefix}.{n}.bias"] = (d, d), (d,)
        for n in ("q_norm", "k_norm"):
            shapes[f"{prefix}.{n}.weight"], shapes[f"{prefix}.{n}.bias"] = (64,), (64,)

    def mlp(prefix):
        shapes.update({f"{prefix}.fc1.weight": (4 * d, d), f"{prefix}.fc1.bias": (4 * d,)})
        shapes.update({f"{prefix}.fc2.weight": (d, 4 * d), f"{prefix}.fc2.bias": (d,)})

    for stack, n in (("encoder_layers", enc_layers), ("decoder_layers", dec_layers)):
        for i in range(n):
            p = f"{stack}.{i}"
            shapes[f"{p}.gate1"] = shapes[f"{p}.gate2"] = (d,)
            for norm in ("norm1", "norm2"):
                shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (d,)
            attention(f"{p}.attention")
            mlp(f"{p}.mlp")
    shapes.update(
        {
            "patchify.weight": (d, 3, patch, patch),
            "patchify.bias": (d,),
            "quant_in_conv.weight": (vq, d, 1, 1),
            "quant_out_conv.weight": (d, vq, 1, 1),
            "quantize.embedding.weight": (codebook, vq),
            "quantize.codebook_used": (65536,),
            "query_embedding.weight": (table, rank),
            "query_linear.weight": (d, rank),
            "query_linear.bias": (d,),
            "decoder_embedding.weight": (table, d),
        }
    )
    net = "diff_decoder.net"
    pp = 3 * dec_patch * dec_patch
    shapes.update({f"{net}.cond_mlp.weight": (d, d), f"{net}.cond_mlp.bias": (d,)})
    shapes.update({f"{net}.conv_in.weight": (d, pp, 1, 1), f"{net}.conv_in.bias": (d,)})
    shapes.update({f"{net}.conv_out.weight": (pp, d, 1, 1), f"{net}.conv_out.bias": (pp,)})
    for i in range(depth):
        p = f"{net}.blocks.{i}"
        attention(f"{p}.attention")
        attention(f"{p}.cross_attn")
        mlp(f"{p}.mlp")
        shapes.update({f"{p}.adaLN_modulation.1.weight": (6 * d, d), f"{p}.adaLN_modulation.1.bias": (6 * d,)})
        for j in (0, 2):
            shapes.update({f"{p}.time_embed.mlp.{j}.weight": (d, d), f"{p}.time_embed.mlp.{j}.bias": (d,)})
            shapes.update({f"{p}.cond_embed.{j}.weight": (d, d), f"{p}.cond_embed.{j}.bias": (d,)})
    for j, (o, i) in zip((0, 2, 4), ((2048, d), (2048, 2048), (768, 2048)), strict=True):
        shapes.update({f"{net}.repa_out.{j}.weight": (o, i), f"{net}.repa_out.{j}.bias": (o,)})
    return shapes


def official_gpt_shapes(dim: int, n_layer: int, ffn: int, vocab=16384, classes=1000) -> dict[str, tuple]:
    """LlamaGen `Transformer` (c2i, 1 class token, no GQA) state_dict."""
    shapes = {
        "cls_embedding.embedding_table.weight": (classes + 1, dim),
        "tok_embeddings.weight": (vocab, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    for i in range(n_layer):
        p = f"layers.{i}"
        shapes.update(
            {
                f"{p}.attention.wqkv.weight": (3 * dim, dim),
                f"{p}.attention.wo.weight": (dim, dim),
                f"{p}.feed_forward.w1.weight": (ffn, dim),
                f"{p}.feed_forward.w3.weight": (ffn, dim),
                f"{p}.feed_forward.w2.weight": (dim, ffn),
                f"{p}.attention_norm.weight": (dim,),
                f"{p}.ffn_norm.weight": (dim,),
            }
        )
    return shapes


def meta_dict(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def tiny_tokenizer() -> DARTokenizer:
    torch.manual_seed(0)
    tok = DARTokenizer(DAR_TOKENIZER_CONFIGS["tiny"])
    with torch.no_grad():  # non-trivial weights (the official init zeroes the gates and the output conv)
        for p in tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok.eval()


def tiny_gpt() -> DARGPT:
    torch.manual_seed(0)
    gpt = DARGPT(DAR_GPT_CONFIGS["tiny"])
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    return gpt


# ---------------------------------------------------------------------------- sizes and keys
def test_param_counts_match_official():
    with torch.device("meta"):
        tok = DARTokenizer(DAR_TOKENIZER_CONFIGS["v1"])
        counts = {k: sum(p.numel() for p in DARGPT(DAR_GPT_CONFIGS[k]).parameters()) for k in ("L", "XL")}
    n_tok = sum(p.numel() for p in tok.parameters())
    assert abs(n_tok / 307_444_672 - 1) < 0.005
    repa = sum(p.numel() for p in tok.diff_decoder.net.repa_out.parameters())
    assert abs((sum(p.numel() for p in tok.diff_decoder.parameters()) - repa) / 185.13e6 - 1) < 0.005  # paper "185M"
    assert abs(counts["L"] / 342.9e6 - 1) < 0.005
    assert abs(counts["XL"] / 774.7e6 - 1) < 0.005


def test_official_tokenizer_layout_loads_strict():
    with torch.device("meta"):
        tok = DARTokenizer(DAR_TOKENIZER_CONFIGS["v1"])
    official = official_tokenizer_shapes()
    assert len(official) == 830
    report = load_state_dict_strict(tok, meta_dict(official), source="official v1", assign=True)
    assert report.ok and len(report.loaded) == 830


def test_official_gpt_layouts_load_strict():
    for name, (dim, n_layer, ffn) in {"L": (1024, 24, 2816), "XL": (1280, 36, 3584)}.items():
        with torch.device("meta"):
            gpt = DARGPT(DAR_GPT_CONFIGS[name])
        report = load_state_dict_strict(gpt, meta_dict(official_gpt_shapes(dim, n_layer, ffn)), assign=True)
        assert report.ok and len(report.loaded) == 2 + 7 * n_layer + 2


def test_tiny_random_official_dict_loads_and_mismatch_is_reported():
    gpt = DARGPT(DAR_GPT_CONFIGS["tiny"])
    cfg = DAR_GPT_CONFIGS["tiny"]
    sd = {k: torch.randn(s) for k, s in official_gpt_shapes(64, 2, cfg.ffn_hidden, 256, 10).items()}
    load_state_dict_strict(gpt, sd)
    assert torch.equal(gpt.output.weight, sd["output.weight"])
    bad = dict(sd)
    bad.pop("norm.weight")
    bad["layers.0.attention.wqkv.weight"] = torch.randn(3, 3)
    bad["layers.0.attention.kv_cache.k_cache"] = torch.randn(1)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(gpt, bad, source="bad.pt")
    msg = str(err.value)
    assert "norm.weight" in msg and "kv_cache.k_cache" in msg and "wqkv" in msg and "bad.pt" in msg


# ---------------------------------------------------------------------------- safe loading of official files
class _OfficialConfig:
    """Pickled like showlab/D-AR `config_util.Config` (a mapping that keeps its data in `_data`)."""

    def __init__(self, data):
        self._data = data


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _save_with_fake_config_util(obj, path):
    mod = types.ModuleType("config_util")
    _OfficialConfig.__module__, _OfficialConfig.__qualname__ = "config_util", "Config"
    mod.Config = _OfficialConfig
    sys.modules["config_util"] = mod
    try:
        torch.save(obj, path)
    finally:
        del sys.modules["config_util"]


def test_load_official_tokenizer_file_with_pickled_config(tmp_path):
    model_cfg = {  # official yaml keys, shrunk
        "encoder_patch_size": 16,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "query_low_rank": True,
        "encoder_dim": 128,
        "decoder_dim": 128,
        "vq_dim": 8,
        "vq_codebook_size": 64,
        "num_denoising_steps": 4,
        "num_query_groups": 4,
        "num_all_queries": 16,
        "queries_per_step": 4,
        "vq_enable": True,
        "sampling_resolution": 32,
        "diff_decoder": {"in_dim": 3, "out_dim": 3, "dim": 128, "cond_dim": 128, "patch_size": 8, "depth": 1},
    }
    shapes = official_tokenizer_shapes(d=128, enc_layers=1, dec_layers=1, depth=1, codebook=64)
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    path = tmp_path / "tokenizer.pt"
    _save_with_fake_config_util(
        {"model": sd, "ema": sd, "steps": 5, "config": _OfficialConfig({"model": model_cfg})}, path
    )
    tok = load_dar_tokenizer(str(path))
    assert tok.cfg.width == 128 and tok.cfg.num_tokens == 16 and tok.cfg.num_steps == 4
    assert torch.equal(tok.quantize.embedding.weight, sd["quantize.embedding.weight"])
    ids = tok.encode_tokens(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64

    torch.save({"model": sd, "config": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="GLOBAL print"):
        load_dar_tokenizer(str(tmp_path / "evil.pt"))
    with pytest.raises(FileNotFoundError, match="showlab/D-AR"):
        load_dar_tokenizer(str(tmp_path / "missing.pt"))


def test_load_official_gpt_file(tmp_path):
    cfg = DAR_GPT_CONFIGS["tiny"]
    sd = {"_orig_mod." + k: torch.randn(s) for k, s in official_gpt_shapes(64, 2, cfg.ffn_hidden, 256, 10).items()}
    torch.save({"model": sd, "steps": 1}, tmp_path / "gpt.pt")
    gpt = load_dar_gpt(str(tmp_path / "gpt.pt"), "tiny")
    assert torch.equal(gpt.norm.weight, sd["_orig_mod.norm.weight"])
    assert sample_tokens(gpt, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0)).shape == (2, 32)


# ---------------------------------------------------------------------------- GPT sampling
def test_kv_cache_sampling_matches_full_recompute():
    gpt, labels = tiny_gpt(), torch.tensor([1, 2, 3, 4])
    kw = dict(cfg_start=1.1, cfg_end=4.0, temperature=1.0)
    a = sample_tokens(gpt, labels, generator=torch.Generator().manual_seed(7), **kw)
    b = sample_tokens(gpt, labels, generator=torch.Generator().manual_seed(7), use_kv_cache=False, **kw)
    c = sample_tokens(gpt, labels, generator=torch.Generator().manual_seed(7), **kw)
    d = sample_tokens(gpt, labels, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (4, 32) and torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


def test_caches_are_released_and_training_works_after_sampling():
    gpt = tiny_gpt().train()
    keys = list(gpt.state_dict())
    sample_tokens(gpt, torch.tensor([0, 1]), cfg_start=2.0, generator=torch.Generator().manual_seed(0))
    assert gpt.training and list(gpt.state_dict()) == keys
    assert not any(isinstance(v, KVCache) for m in gpt.modules() for v in vars(m).values())
    tokens = torch.randint(0, 256, (3, 32))
    logits = gpt(tokens, torch.tensor([0, 5, 9]))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss) and gpt.tok_embeddings.weight.grad is not None


def test_cfg_schedule_values_and_guidance():
    s = cfg_schedule(1.1, 8.0, 256)
    assert s.shape == (256,) and s[0].item() == pytest.approx(1.1) and s[-1].item() == pytest.approx(8.0)
    assert torch.allclose(s.diff(), torch.full((255,), 6.9 / 255), atol=1e-5)
    assert cfg_schedule(1.0, 4.0, 10)[0].item() == pytest.approx(1.001)
    assert torch.all(cfg_schedule(4.0, 4.0, 3) == 4.0)
    # the CFG formula itself: tests/test_behaviours.py (stub logits) and tests/test_golden.py (official sampler)


def test_layout_control_keeps_prefix():
    gpt, tok = tiny_gpt(), tiny_tokenizer()
    ref = torch.rand(1, 3, 32, 32) * 2 - 1
    ref_tokens = tok.encode_tokens(ref)
    tokens, images = sample_with_layout(
        gpt, tok, ref, torch.tensor([3, 7]), num_prefix=8, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(tokens[:, :8], ref_tokens[:, :8].expand(2, -1))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    # the sampled part still depends on the label
    assert not torch.equal(tokens[0, 8:], tokens[1, 8:])


# ---------------------------------------------------------------------------- tokenizer
def test_group_rule_and_schedule():
    tok = tiny_tokenizer()
    u = torch.tensor([0.0, 0.06, 0.07, 0.5, 0.8, 0.82, 0.999])
    assert tok.group_of(u).tolist() == [0, 0, 1, 4, 6, 7, 7]
    times, groups = tok.schedule(8)
    assert groups == list(range(8))
    expected = [0, 0.0667, 0.1429, 0.2308, 0.3333, 0.4545, 0.6, 0.7778, 1.0]  # notes 1.7, time shift 2
    assert times == pytest.approx(expected, abs=1e-4)


def test_condition_transformer_is_causal():
    tok = tiny_tokenizer()
    ids = torch.randint(0, 256, (1, 32))
    ids2 = ids.clone()
    ids2[0, 12] = (ids[0, 12] + 1) % 256
    with torch.no_grad():
        a, b = (tok.condition(tok.quantize.lookup(x)) for x in (ids, ids2))
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6) and not torch.allclose(a[:, 12:], b[:, 12:])


def test_tokenizer_training_forward_backward():
    tok = tiny_tokenizer().train()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    out = tok(x)
    loss = out["fm_loss"] + out["vq_loss"] + out["commit_loss"]
    loss.backward()
    assert torch.isfinite(loss) and out["x1_hat"].shape == x.shape and out["h_repa"].shape == (3, 16, 64)
    assert tok.query_embedding.weight.grad.abs().sum() > 0  # gradient reaches the encoder through the VQ
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0


def test_stream_decode_matches_full_decode_and_previews():
    tok = tiny_tokenizer()
    ids = tok.encode_tokens(torch.rand(2, 3, 32, 32) * 2 - 1)
    full = tok.decode_tokens(ids, torch.Generator().manual_seed(0))
    chunks = (ids[:, i : i + 1] for i in range(ids.shape[1]))  # tokens arriving one by one
    yields = list(tok.stream_decode(chunks, torch.Generator().manual_seed(0)))
    assert len(yields) == 8
    assert torch.allclose(yields[-1], full, atol=1e-5)
    assert all(y.shape == (2, 3, 32, 32) and torch.isfinite(y).all() for y in yields)
    assert not torch.allclose(yields[0], yields[-1])
    # the previews themselves (prefix and streamed) are pinned against the official clip_steps decode in
    # tests/test_golden.py; a prefix shorter than one group is refused
    with pytest.raises(ValueError, match="one token group"):
        tok.decode_prefix(ids[:, :3])


def test_gpt_tokens_stream_into_the_tokenizer():
    gpt, tok = tiny_gpt(), tiny_tokenizer()
    labels = torch.tensor([0, 1])
    stream = iter_tokens(gpt, labels, cfg_start=1.5, generator=torch.Generator().manual_seed(0))
    images = list(tok.stream_decode(stream, torch.Generator().manual_seed(1)))
    tokens = sample_tokens(gpt, labels, cfg_start=1.5, generator=torch.Generator().manual_seed(0))
    full = tok.decode_tokens(tokens, torch.Generator().manual_seed(1))
    assert len(images) == 8 and torch.allclose(images[-1], full, atol=1e-5)


def test_pickle_of_official_config_roundtrip_sanity():
    # the fake class really pickles under the official name (guards the test helper above)
    mod = types.ModuleType("config_util")
    _OfficialConfig.__module__, _OfficialConfig.__qualname__ = "config_util", "Config"
    mod.Config = _OfficialConfig
    sys.modules["config_util"] = mod
    try:
        assert b"config_util" in pickle.dumps(_OfficialConfig({}))
    finally:
        del sys.modules["config_util"]


def test_cond_residual_adds_cross_attention_to_the_stream_and_is_off_by_default():
    """Opt-in `cond_residual`: with the AdaLN output zeroed (gates 0) the official block is the identity and the
    opt-in block adds exactly the cross-attention readout, computed here by hand (softmax attention of LN(x) with
    2D RoPE on the queries over LN(cond_embed(cond)))."""
    import math

    from models.dar_tokenizer import SiTBlock, rope_angles_2d

    assert DAR_TOKENIZER_CONFIGS["v1"].cond_residual is False and DAR_TOKENIZER_CONFIGS["v1"].time_power == 1.0
    torch.manual_seed(0)
    dim, hd, side = 32, 16, 4
    x, cond, t = torch.randn(2, side * side, dim), torch.randn(2, 3, dim), torch.rand(2)
    rope = rope_angles_2d(side, side, hd, 10000.0)
    official, opt_in = SiTBlock(dim, hd, 2), SiTBlock(dim, hd, 2, cond_residual=True)
    opt_in.load_state_dict(official.state_dict())  # same keys: checkpoints are interchangeable
    for block in (official, opt_in):
        torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
        torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)
    ln = lambda v: (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)
    ca = official.cross_attn
    c = ln(official.cond_embed(cond))
    heads = lambda v: v.view(2, -1, dim // hd, hd).transpose(1, 2)
    q, k, v = heads(ca.q(ln(x))), heads(ca.k(c)), heads(ca.v(c))
    q, k = ca.q_norm(q), ca.k_norm(k)
    cos, sin = rope.cos(), rope.sin()  # rotate channel pairs (2i, 2i+1) of the queries only
    q = torch.stack([q[..., 0::2] * cos - q[..., 1::2] * sin, q[..., 0::2] * sin + q[..., 1::2] * cos], -1).flatten(-2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    sc = ca.proj(attn.transpose(1, 2).reshape(2, -1, dim))
    with torch.no_grad():
        torch.testing.assert_close(official(x, cond, t, rope), x)
        torch.testing.assert_close(opt_in(x, cond, t, rope), x + sc, atol=1e-5, rtol=1e-4)


def test_time_power_skews_training_times_to_the_noise_end():
    """u = U ** p: E[u] = 1 / (p + 1); the decoder receives t = u / (u + beta (1 - u)), inverted here by hand."""
    import dataclasses

    cfg = dataclasses.replace(DAR_TOKENIZER_CONFIGS["tiny"], image_size=8, encoder_patch_size=4, dec_patch_size=4)
    beta = cfg.time_shift
    for power, expected in ((1.0, 0.5), (3.0, 0.25)):
        torch.manual_seed(0)
        tok = DARTokenizer(dataclasses.replace(cfg, time_power=power, repa_grid=1))
        with torch.no_grad():
            t = torch.cat([tok(torch.rand(512, 3, 8, 8) * 2 - 1)["t"] for _ in range(4)])
        u = beta * t / (1 + (beta - 1) * t)
        assert abs(u.mean().item() - expected) < 0.02, (power, u.mean().item())


def test_train_time_shift_changes_training_times_only():
    """Opt-in `train_time_shift` (the demo: 8, official time_shift 2 kept for sampling): training times follow
    t = u / (u + 8 (1 - u)) (inverted by hand: E[u] = 1/2 for uniform u), the sampling schedule stays at shift 2."""
    import dataclasses

    cfg = dataclasses.replace(
        DAR_TOKENIZER_CONFIGS["tiny"], image_size=8, encoder_patch_size=4, dec_patch_size=4, repa_grid=1,
        time_power=1.0, train_time_shift=8.0,
    )  # fmt: skip
    torch.manual_seed(0)
    tok = DARTokenizer(cfg)
    with torch.no_grad():
        t = torch.cat([tok(torch.rand(512, 3, 8, 8) * 2 - 1)["t"] for _ in range(4)])
    u = 8.0 * t / (1 + 7.0 * t)
    assert abs(u.mean().item() - 0.5) < 0.02, u.mean().item()
    u2 = 2.0 * t / (1 + t)  # had training used the sampling shift 2, this would be uniform; it is skewed low
    assert u2.mean().item() < 0.35
    times, _ = tok.schedule(8)
    assert times == pytest.approx([0, 0.0667, 0.1429, 0.2308, 0.3333, 0.4545, 0.6, 0.7778, 1.0], abs=1e-4)


@pytest.mark.parametrize("conv", [False, True])
def test_dec_conv_mlp_mixes_the_3x3_neighbourhood_and_is_off_by_default(conv):
    """Opt-in `dec_conv_mlp`: a decoder MLP is token-local (official) or mixes exactly the 3x3 neighbourhood of
    the image-token grid (residual depthwise conv after fc1, hand-computed conv in tests/test_transdiff_small.py);
    with it off the keys are the official ones."""
    import dataclasses

    from models.dar_tokenizer import DiffusionCore

    assert DAR_TOKENIZER_CONFIGS["v1"].dec_conv_mlp is False
    cfg = dataclasses.replace(DAR_TOKENIZER_CONFIGS["tiny"], dec_conv_mlp=conv)
    core = DiffusionCore(cfg)
    assert any("dwconv" in k for k in core.state_dict()) == conv
    mlp = core.blocks[0].mlp
    x = torch.randn(1, 64, cfg.width, requires_grad=True)  # 8 x 8 image tokens
    (grad,) = torch.autograd.grad(mlp(x)[0, 27].sum(), x)  # token 27 = (row 3, col 3)
    touched = {n for n in range(64) if grad[0, n].abs().sum() > 0}
    assert touched == ({(3 + dr) * 8 + 3 + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)} if conv else {27})

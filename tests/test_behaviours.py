"""Behaviours the golden parity data cannot pin, each against a hand-computed or stub expectation.

CFG formulas (stub networks with known outputs), label-dropout rates (statistical), which token group conditions
each D-AR denoising step (stub core recording its condition), the VQ straight-through gradient, AdamW parameter
groups, VAE posterior sampling.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import models.dar_gpt as dar_gpt
from lightning_modules.dar import DARGPTModule
from lightning_modules.transdiff import TransDiffModule
from models.dar_gpt import DAR_GPT_CONFIGS, DARGPT, sample_tokens
from models.dar_tokenizer import DAR_TOKENIZER_CONFIGS, DARTokenizer
from models.transdiff import TRANSDIFF_CONFIGS, DiffDecoder, TransDiff
from models.vae import KL16VAE


# ---------------------------------------------------------------------------------------------------- CFG formulas
class ConstVelocity(nn.Module):
    """v(x, c, t) = c[:, 0, 0] everywhere: the conditional rows carry one constant, the unconditional another."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: Tensor, c: Tensor, t: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return c[:, :1, :1].expand_as(x).clone()


def test_transdiff_cfg_combines_velocities_as_u_plus_s_times_c_minus_u():
    dd = DiffDecoder(replace(TRANSDIFF_CONFIGS["tiny"], decoder_prediction="v"))  # stub returns velocities
    dd.net = ConstVelocity()
    B, N, C = 2, 4, 3
    c = torch.cat([torch.full((B, 5, 7), 3.0), torch.full((B, 5, 7), 1.0)])  # v_c = 3, v_u = 1
    x0 = torch.randn(B, N, C)
    # one network call: the deterministic final step from t = 1 to 0: x <- x + (x + (2 - t) v) * (0 - 1) = -v
    out = dd.sample(c, x0, num_steps=1, cfg=2.5)
    assert torch.allclose(out, torch.full((B, N, C), -(1.0 + 2.5 * (3.0 - 1.0))))  # -(u + s (c - u)) = -6
    assert dd.net.batches == [2 * B]
    # cfg = 1: no unconditional batch, v = v_c
    dd.net.batches.clear()
    out = dd.sample(c[:B], x0, num_steps=1, cfg=1.0)
    assert torch.allclose(out, torch.full((B, N, C), -3.0)) and dd.net.batches == [B]


def test_transdiff_mrar_uses_one_cfg_scale_per_round(monkeypatch):
    """MRAR samples in 4 rounds, round k with cfg[k] (the official per-round list)."""
    model = TransDiff(TRANSDIFF_CONFIGS["tiny_mrar"]).eval()
    seen = []

    def record(self, c, noise, num_steps, cfg, scale_0, scale_1, generator):
        seen.append((cfg, c.shape[0], c.shape[1]))
        return torch.zeros_like(noise)

    monkeypatch.setattr(DiffDecoder, "sample", record)
    model.sample(torch.tensor([1, 2]), num_steps=2, cfg=[1.0, 2.0, 3.0, 4.0])
    blk = model.cfg.block_len
    assert seen == [(1.0, 2, blk), (2.0, 4, 2 * blk), (3.0, 4, 3 * blk), (4.0, 4, 4 * blk)]


class ConstLogitsGPT(DARGPT):
    """Logits Lc for the conditional rows (first half of a CFG batch), Lu for the unconditional ones."""

    def __init__(self, lc: Tensor, lu: Tensor) -> None:
        super().__init__(DAR_GPT_CONFIGS["tiny"])
        self.lc, self.lu = lc, lu

    def transformer(self, h: Tensor, start: int = 0, caches=None) -> Tensor:
        b, t = h.shape[:2]
        rows = torch.cat([self.lc.expand(b // 2, -1), self.lu.expand(b // 2, -1)]) if b > 1 else self.lc[None]
        return rows[:, None].expand(-1, t, -1).clone()


def test_dar_cfg_combines_logits_with_the_linear_schedule(monkeypatch):
    V = DAR_GPT_CONFIGS["tiny"].vocab_size
    N = DAR_GPT_CONFIGS["tiny"].block_size
    g = torch.Generator().manual_seed(0)
    lc, lu = torch.randn(V, generator=g), torch.randn(V, generator=g)
    model = ConstLogitsGPT(lc, lu)
    seen: list[Tensor] = []
    real = dar_gpt.sample_logits
    monkeypatch.setattr(dar_gpt, "sample_logits", lambda logits, *a: seen.append(logits.clone()) or real(logits, *a))
    sample_tokens(model, torch.tensor([3]), cfg_start=1.5, cfg_end=4.0, generator=torch.Generator().manual_seed(1))
    assert len(seen) == N
    for i, logits in enumerate(seen):
        s = 1.5 + (4.0 - 1.5) * i / (N - 1)  # linspace(start, end, N)[i]
        torch.testing.assert_close(logits[0], lu + s * (lc - lu), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- label dropout
def test_transdiff_label_dropout_rate():
    model = TransDiff(TRANSDIFF_CONFIGS["tiny"]).train()  # label_drop_prob 0.1
    n = 20_000
    labels = torch.randint(0, model.cfg.num_classes, (n,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model.class_embedding(labels, torch.Generator().manual_seed(1))
        dropped = (emb == model.fake_latent).all(-1).float().mean().item()
        kept = (emb == model.class_emb(labels)).all(-1).float().mean().item()
        assert not (model.eval().class_embedding(labels) == model.fake_latent).all(-1).any()
    sigma = (0.1 * 0.9 / n) ** 0.5
    assert abs(dropped - 0.1) < 5 * sigma and dropped + kept == pytest.approx(1.0)


def test_dar_gpt_label_dropout_rate():
    torch.manual_seed(0)
    model = DARGPT(DAR_GPT_CONFIGS["tiny"]).train()  # class_dropout_prob 0.1
    n, null = 20_000, model.cfg.num_classes
    labels = torch.randint(0, null, (n,))
    with torch.no_grad():
        emb = model.cls_embedding(labels)[:, 0]  # (n, D)
        dropped = (emb == model.cls_embedding.embedding_table.weight[null]).all(-1).float().mean().item()
        assert (
            not (model.eval().cls_embedding(labels)[:, 0] == model.cls_embedding.embedding_table.weight[null])
            .all(-1)
            .any()
        )
    assert abs(dropped - 0.1) < 5 * (0.09 / n) ** 0.5


# ---------------------------------------------------------------------------------------------------- D-AR groups
class RecordingCore(nn.Module):
    """Stand-in velocity net: records (t, cond) of each call and returns a zero velocity."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> tuple[Tensor, None]:
        self.calls.append((t.detach().clone(), cond.detach().clone()))
        return torch.zeros_like(x) + 0 * cond.sum(), None


def _tiny_tokenizer() -> DARTokenizer:
    torch.manual_seed(0)
    tok = DARTokenizer(DAR_TOKENIZER_CONFIGS["tiny"])
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok


@pytest.mark.parametrize(("steps", "groups"), [(8, [0, 1, 2, 3, 4, 5, 6, 7]), (3, [0, 3, 5]), (6, [0, 1, 3, 4, 5, 7])])
def test_dar_decode_step_i_is_conditioned_on_its_group(steps, groups):
    """Official rule: step i at raw time u = i/steps uses group round(8 u) (hand-computed here), clamped to 7."""
    tok = _tiny_tokenizer().eval()
    ids = tok.encode_tokens(torch.rand(2, 3, 32, 32) * 2 - 1)
    full = tok.condition(tok.quantize.lookup(ids))  # (B, 32, D); 8 groups of 4
    tok.diff_decoder.net = RecordingCore()
    tok.decode_tokens(ids, torch.Generator().manual_seed(0), steps=steps)
    calls = tok.diff_decoder.net.calls
    assert len(calls) == steps
    for (_t, cond), g in zip(calls, groups, strict=True):
        torch.testing.assert_close(cond, full[:, 4 * g : 4 * g + 4])


def test_dar_training_is_conditioned_on_the_group_of_its_time():
    tok = _tiny_tokenizer().train()
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, _, _ = tok.quantize(tok.encode_continuous(x))
        full = tok.condition(z_q)
    tok.diff_decoder.net = RecordingCore()
    torch.manual_seed(3)
    tok(x)
    ((t, cond),) = tok.diff_decoder.net.calls
    u = 2 * t / (1 + t)  # invert the time shift t = u / (u + 2 (1 - u))
    for b in range(x.shape[0]):
        g = min(int(u[b].item() * 8 + 0.5), 7)
        torch.testing.assert_close(cond[b], full[b, 4 * g : 4 * g + 4])


def test_flow_loss_alone_reaches_the_tokenizer_encoder():
    """The VQ straight-through estimator: d fm_loss / d encoder != 0 (without it only the codebook gets gradient)."""
    tok = _tiny_tokenizer().train()
    out = tok(torch.rand(4, 3, 32, 32) * 2 - 1)
    out["fm_loss"].backward()
    for p in (tok.patchify.weight, tok.quant_in_conv.weight, tok.encoder_layers[0].attention.q.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- optimizer
def _groups(module) -> tuple[set[str], set[str], list[float]]:
    opt = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.net.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    return decay, no_decay, [g["weight_decay"] for g in opt.param_groups]


def test_transdiff_adamw_groups_and_their_log(caplog):
    torch.manual_seed(0)
    m = TransDiffModule(arch="tiny", vae="identity", lr=1e-3, weight_decay=0.02, total_steps=10)
    with caplog.at_level(logging.INFO):
        decay, no_decay, wd = _groups(m)
    assert wd == [0.02, 0.0]
    # official (MAR) rule: decay the encoder's matrices and embeddings; nothing of the decoder, no bias, no norm
    for name in ("class_emb.weight", "fake_latent", "mask_token", "encoder_pos_embed_learned",
                 "encoder_blocks.0.attn.qkv.weight", "encoder_blocks.1.mlp.fc1.weight"):  # fmt: skip
        assert name in decay, name
    for name in ("encoder_blocks.0.attn.qkv.bias", "encoder_norm.weight", "z_proj_ln.weight",
                 "diffdecoder.net.input_proj.weight", "diffdecoder.net.res_blocks.0.attn1.qkv.weight",
                 "diffdecoder.net.diffusion_pos_embed_learned"):  # fmt: skip
        assert name in no_decay, name
    n_decay = sum(p.numel() for n, p in m.net.named_parameters() if n in decay)
    assert f"{len(decay)} tensors with weight decay 0.02 ({n_decay:,} parameters)" in caplog.text


def test_dar_gpt_adamw_groups():
    torch.manual_seed(0)
    m = DARGPTModule(gpt="tiny", lr=1e-3, weight_decay=0.05, total_steps=10)
    decay, no_decay, wd = _groups(m)
    assert wd == [0.05, 0.0]
    assert {"tok_embeddings.weight", "output.weight", "layers.0.attention.wqkv.weight"} <= decay
    assert {"norm.weight", "layers.0.attention_norm.weight", "layers.1.ffn_norm.weight"} <= no_decay


# ---------------------------------------------------------------------------------------------------- VAE posterior
def test_training_latents_are_posterior_samples_not_means():
    m = TransDiffModule(arch="tiny", vae="identity")
    mean, logvar = torch.randn(3, 16, 2, 2), torch.full((3, 16, 2, 2), 2 * torch.tensor(0.5).log().item())
    torch.manual_seed(7)
    z = m.latents({"moments": torch.cat([mean, logvar], dim=1), "label": torch.zeros(3, dtype=torch.long)})
    torch.manual_seed(7)
    eps = torch.randn(3, 16, 2, 2)
    assert m.vae.scale_factor == 1.0 and KL16VAE.scale_factor == 0.2325  # pixel-space stand-in; MAR's KL-16
    torch.testing.assert_close(z, mean + 0.5 * eps)  # std = exp(logvar / 2) = 0.5


# ---------------------------------------------------------------------------------------------------- EMA
def test_first_ema_update_blends_like_the_official_update_ema(tmp_path):
    """Official (MAR/TransDiff, D-AR): EMA starts as a copy and every step, the first included, blends."""
    import lightning as L

    from tests.toy import ToyData, ToyGenerator

    torch.manual_seed(0)
    m = ToyGenerator(lr=0.1, ema_decay=0.75, warmup_steps=0)
    init = {k: v.clone() for k, v in m.net.state_dict().items()}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(m, ToyData())
    new, ema = m.net.state_dict(), m.ema_net.state_dict()
    assert any(not torch.equal(new[k], init[k]) for k in new)
    for k in new:
        torch.testing.assert_close(ema[k], 0.75 * init[k] + 0.25 * new[k])


def _toy_sd(seed: int) -> dict[str, Tensor]:
    from tests.toy import ToyNet

    torch.manual_seed(seed)
    return ToyNet().state_dict()


@pytest.mark.parametrize("lightning_file", [False, True])
def test_init_from_loads_raw_into_net_and_ema_into_the_ema_copy(tmp_path, lightning_file):
    from tests.toy import ToyGenerator

    raw, ema = _toy_sd(1), _toy_sd(2)
    path = tmp_path / "init.pt"
    if lightning_file:
        sd = {**{f"net.{k}": v for k, v in raw.items()}, **{f"ema_net.{k}": v for k, v in ema.items()}}
        torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": sd}, path)
    else:
        torch.save({"model": raw, "model_ema": ema}, path)
    for use_ema, expect_ema in ((True, ema), (False, raw)):
        m = ToyGenerator(ema_decay=0.9, init_from=str(path), init_use_ema=use_ema)
        m.load_init_weights(str(path))
        for k in raw:
            assert torch.equal(m.net.state_dict()[k], raw[k]), k
            assert torch.equal(m.ema_net.state_dict()[k], expect_ema[k]), k
    # a file with EMA weights only initialises both from them
    torch.save({"ema": ema}, path)
    m = ToyGenerator(ema_decay=0.9, init_from=str(path))
    m.load_init_weights(str(path))
    assert all(
        torch.equal(m.net.state_dict()[k], ema[k]) and torch.equal(m.ema_net.state_dict()[k], ema[k]) for k in ema
    )


# ---------------------------------------------------------------------------------------------------- recipes
def test_dar_recipes_sample_with_the_official_cfg_schedules():
    """D-AR-L: the official FID script's 1.2 -> 8.0 (eval_c2i_fid.sh); D-AR-XL: the paper's 1.1 -> 10.0."""
    from pathlib import Path

    from ardiff.cli import recipe_model_section

    root = Path(__file__).resolve().parents[1] / "experiments" / "dar"
    for size, expected in (("L", (1.2, 8.0)), ("XL", (1.1, 10.0))):
        args = recipe_model_section(str(root / f"gpt_{size}.yaml"))["init_args"]  # includes merged, as `-c` reads it
        assert (args["cfg_start"], args["cfg_end"]) == expected == dar_gpt.DAR_CFG_SCHEDULES[size]
        assert (args["temperature"], args["top_k"], args["top_p"]) == (1.0, 0, 1.0)


def test_gpt_chunk_after_a_cached_prefix_is_refused():
    model = DARGPT(DAR_GPT_CONFIGS["tiny"]).eval()
    caches = [dar_gpt.KVCache() for _ in model.layers]
    with torch.no_grad():
        model.transformer(model.cls_embedding(torch.tensor([1])), 0, caches)
        with pytest.raises(ValueError, match="one token at a time"):
            model.transformer(model.tok_embeddings(torch.tensor([[1, 2]])), 1, caches)


def test_vq_distances_take_the_ambient_precision_as_official():
    """Official training computes the VQ distances under bf16 autocast; ours too (and exactly in fp32 without)."""
    from models.dar_tokenizer import DARTokenizerConfig, VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(DARTokenizerConfig(codebook_size=4096, vq_dim=8))
    z = torch.randn(2, 512, 8)
    zn, en = F.normalize(z, dim=-1), F.normalize(vq.embedding.weight, dim=-1)
    assert torch.equal(vq(z)[1], (zn.double() @ en.double().t()).argmax(-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ids, _ = vq(z)
    bf16 = (zn.bfloat16() @ en.bfloat16().t()).argmax(-1)
    assert torch.equal(ids, bf16) and not torch.equal(bf16, (zn.double() @ en.double().t()).argmax(-1))


def test_recipes_train_on_the_official_crops():
    from pathlib import Path

    from ardiff.cli import read_recipe

    root = Path(__file__).resolve().parents[1] / "experiments"
    expected = {"dar/tokenizer_v1.yaml": ("random", False), "dar/gpt_L.yaml": ("ten", True),
                "dar/gpt_XL.yaml": ("ten", True), "transdiff/transdiff_large_mrar.yaml": ("square", True)}  # fmt: skip
    for recipe, (crop, flip) in expected.items():
        data = read_recipe(str(root / recipe))["data"]["init_args"]  # includes merged, as `-c` reads it
        assert (data.get("crop", "center"), data.get("flip", True)) == (crop, flip), recipe
    for size in ("base", "large", "huge"):  # 1-step recipes read cached center-crop latents (+ flip), as official
        data = read_recipe(str(root / f"transdiff/transdiff_{size}.yaml"))["data"]["init_args"]
        assert data["kind"] == "latent" and data.get("crop", "center") == "center"


# ---------------------------------------------------------------------------------------------------- bf16 weights
def test_bf16_inference_copy_of_the_gpt(monkeypatch):
    from tests.test_golden import load

    g = load("dar_gpt")
    model = DARGPT(dar_gpt.GPTConfig(**g["config"]))
    model.load_state_dict(g["state_dict"])
    model.eval()
    fast = dar_gpt.bf16_inference_copy(model)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters()) and fast.freqs_cis.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
    tokens, labels = g["inputs"]["tokens"], g["inputs"]["labels"]
    with torch.no_grad():
        ref, out = g["outputs"]["logits"], fast(tokens, labels)  # official fp32 logits vs ours with bf16 weights
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert sample_tokens(fast, labels, cfg_start=1.5, cfg_end=3.0, generator=torch.Generator()).shape == tokens.shape

    # the module samples with a bf16 copy of its (EMA or online) GPT when asked
    m = DARGPTModule(gpt="tiny", sample_bf16_weights=True)
    seen = []
    monkeypatch.setattr("lightning_modules.dar.sample_tokens", lambda net, *a, **k: seen.append(net) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        m.sample_images(torch.tensor([0]))
    assert seen[0] is not m.net and next(seen[0].parameters()).dtype == torch.bfloat16

"""Parity with the official TransDiff and D-AR code, without the official code: golden outputs it computed.

`tests/golden/*.pt` were written by `python -m benchmarks.make_golden` (see its docstring for how the official
randomness was injected) from small configs with our weights loaded into the official models. Here our models take
the same weights and inputs (and the same random draws) and must give the same outputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import models.transdiff as transdiff_mod
from models.dar_gpt import DARGPT, GPTConfig, KVCache, sample_tokens
from models.dar_tokenizer import DARTokenizer, DARTokenizerConfig
from models.transdiff import TRANSDIFF_CONFIGS, TransDiff

GOLDEN = Path(__file__).parent / "golden"


def load(name: str) -> dict:
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------- TransDiff
@pytest.fixture(scope="module", params=["transdiff", "transdiff_mrar"])
def td(request):
    g = load(request.param)
    model = TransDiff(replace(TRANSDIFF_CONFIGS[g["preset"]], **g["config"]))
    model.load_state_dict(g["state_dict"], strict=True)
    return model.eval(), g


def _refs(model: TransDiff, latents: torch.Tensor) -> torch.Tensor:
    b, n = latents.shape[:2]  # MRAR: the first 3 images are the references
    return model.patchify(latents[:, : n - 1].flatten(0, 1), 2).unflatten(0, (b, n - 1))


def test_transdiff_encoder_features(td):
    model, g = td
    inp = g["inputs"]
    with torch.no_grad():
        refs = _refs(model, inp["latents"]) if model.cfg.mrar else None
        c = model.forward_encoder(model.class_emb(inp["labels"]), refs)
    close(c, g["outputs"]["features"])


def test_transdiff_decoder_velocity(td):
    model, g = td
    inp, out = g["inputs"], g["outputs"]
    with torch.no_grad():
        v = model.diffdecoder.net(inp["x_t"], out["features"], inp["t"])
    close(v, out["velocity"])


def test_transdiff_training_loss_with_official_draws(td, monkeypatch):
    """The official forward (noise per sample, logit-normal time from scipy) with its draws replayed into ours."""
    model, g = td
    inp = g["inputs"]
    draws = list(inp["draws"])  # [noise, normals] per loss term, in the order the official code drew them

    def replay(shape, generator, device):
        x = draws.pop(0)
        assert tuple(x.shape) == tuple(shape), (x.shape, shape)
        return x

    monkeypatch.setattr(transdiff_mod, "_randn", replay)
    with torch.no_grad():
        latents = inp["latents"]
        loss = model(latents, inp["labels"])
    assert not draws
    close(loss, g["outputs"]["loss"], atol=1e-5, rtol=1e-5)


def test_transdiff_cfg_sampler(td):
    """The whole Euler-Maruyama sampler with CFG (MRAR: one scale per round, incl. an unguided round)."""
    model, g = td
    inp = g["inputs"]
    cfg = inp["cfg"]
    out = model.sample(inp["labels"], num_steps=inp["num_steps"], cfg=cfg, scale_0=inp["scale_0"],
                       scale_1=inp["scale_1"], generator=torch.Generator().manual_seed(inp["seed"]))  # fmt: skip
    close(out, g["outputs"]["sample"], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- D-AR GPT
@pytest.fixture(scope="module")
def gpt():
    g = load("dar_gpt")
    model = DARGPT(GPTConfig(**g["config"]))
    model.load_state_dict(g["state_dict"], strict=True)
    return model.eval(), g


def test_dar_gpt_logits(gpt):
    model, g = gpt
    with torch.no_grad():
        logits = model(g["inputs"]["tokens"], g["inputs"]["labels"])
    close(logits, g["outputs"]["logits"])


def test_dar_gpt_kv_cache_logits(gpt):
    model, g = gpt
    tokens, labels = g["inputs"]["tokens"], g["inputs"]["labels"]
    caches = [KVCache() for _ in model.layers]
    with torch.no_grad():
        out = [model.transformer(model.cls_embedding(labels), 0, caches)]
        out += [model.transformer(model.tok_embeddings(tokens[:, i : i + 1]), i + 1, caches)
                for i in range(tokens.shape[1] - 1)]  # fmt: skip
    close(torch.cat(out, dim=1), g["outputs"]["logits_kv"])


@pytest.mark.parametrize("case", ["cfg_topk_topp", "cfg_from_1", "no_cfg"])
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_dar_gpt_sampling(gpt, case, use_kv_cache):
    """The official generate() (CFG schedule, top-k / top-p, temperature) with the same uniform draws."""
    model, g = gpt
    s = g["outputs"]["samples"][case]
    if isinstance(s["cfg_scale"], str):
        start, end = (float(v) for v in s["cfg_scale"].split(","))
    else:
        start = end = float(s["cfg_scale"])
    tokens = sample_tokens(model, g["inputs"]["labels"], cfg_start=start, cfg_end=end, temperature=s["temperature"],
                           top_k=s["top_k"], top_p=s["top_p"], use_kv_cache=use_kv_cache,
                           generator=torch.Generator().manual_seed(g["inputs"]["seed"]))  # fmt: skip
    assert torch.equal(tokens, s["tokens"])


# ---------------------------------------------------------------------------------------------------- D-AR tokenizer
@pytest.fixture(scope="module")
def tok():
    g = load("dar_tokenizer")
    model = DARTokenizer(DARTokenizerConfig(**g["config"]))
    sd = model.state_dict()  # REPA projector and usage tracker (unused in eval) are not stored
    sd.update(g["state_dict"])
    model.load_state_dict(sd, strict=True)
    return model.eval(), g


def test_dar_tokenizer_ids(tok):
    model, g = tok
    assert torch.equal(model.encode_tokens(g["inputs"]["images"]), g["outputs"]["ids"])


def test_dar_tokenizer_full_ab2_decode(tok):
    model, g = tok
    out = model.decode_tokens(g["outputs"]["ids"], torch.Generator().manual_seed(g["inputs"]["seed"]))
    close(out, g["outputs"]["decode"], atol=1e-4)


def test_dar_tokenizer_previews_match_official_clip_steps(tok):
    """Preview after k groups = official decode_code(ids, clip_steps=k), from a prefix and while streaming."""
    model, g = tok
    ids, seed, previews = g["outputs"]["ids"], g["inputs"]["seed"], g["outputs"]["previews"]
    gs = model.cfg.group_size
    streamed = list(model.stream_decode((ids[:, i : i + 1] for i in range(ids.shape[1])),
                                        torch.Generator().manual_seed(seed)))  # fmt: skip
    for k in range(1, model.cfg.num_groups + 1):
        prefix = model.decode_prefix(ids[:, : k * gs], torch.Generator().manual_seed(seed))
        close(prefix, previews[k - 1], atol=1e-4)
        close(streamed[k - 1], previews[k - 1], atol=1e-4)
    # the one-step Euler estimate (kept as an option) is a different image for k >= 2, the same for k = 1
    euler = [model.decode_prefix(ids[:, : k * gs], torch.Generator().manual_seed(seed), preview="euler")
             for k in (1, 2)]  # fmt: skip
    close(euler[0], previews[0], atol=1e-4)
    assert (euler[1] - previews[1]).abs().max() > 1e-3

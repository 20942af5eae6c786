"""Golden parity data for CI: run the OFFICIAL TransDiff and D-AR code on small configs and save what it computes.

    python -m benchmarks.make_golden --official-transdiff /tmp/official/TransDiff --official-dar /tmp/official/D-AR

writes `tests/golden/{transdiff,transdiff_mrar,dar_gpt,dar_tokenizer}.pt` (~5 MB in all; made from TransDiff/TransDiff
`0081b3a` and showlab/D-AR `3fb0f2d`). Only this script needs
the clones (and, for TransDiff, `diffusers`, `transformers` and `scipy` importable); the tests in
`tests/test_golden.py` load the files with `torch.load(weights_only=True)` and compare our models with them.

Each file holds plain tensors and numbers: `config` (the fields that differ from our named preset), `state_dict`
(our perturbed random weights, loaded into the official model with strict keys, see `side_by_side.py`), `inputs`
and `outputs` (what the official code returned), all fp32 on CPU, in eval mode with dropout 0.

Where the official code draws its own randomness, it is made reproducible from outside, without editing its files:

- TransDiff training loss: `torch.randn_like` (the per-sample noise) and `scipy.stats.norm.rvs` (the logit-normal
  time) are wrapped while `Transdiff.forward` runs, and every draw is recorded in order (`inputs["draws"]`); the
  test replays them through our `_randn`.
- TransDiff sampler: `randn_tensor` (initial noise) and `torch.randn_like` (the Euler-Maruyama noise) draw from one
  CPU `torch.Generator` seeded with `inputs["seed"]`, in the order the official code asks; our sampler takes a
  generator with the same seed.
- D-AR GPT sampling: the official top-k / top-p filtering and CFG run unchanged; only `torch.multinomial` is
  replaced by the inverse-CDF draw `(cumsum(probs) < u).sum()` with `u = torch.rand(B, 1, generator=g)`, which is
  how our sampler draws from the same distribution; `g` is seeded with `inputs["seed"]`.
- D-AR tokenizer decode / previews: the official decoder's first draw is `torch.randn(B, 3, H, W)` from the global
  generator, so `torch.manual_seed(seed)` right before `decode_code` equals our decode with
  `torch.Generator().manual_seed(seed)`. Previews are the official `decode_code(ids, clip_steps=k)`.

The official `.cuda()` calls are no-ops while it runs (CPU), and the TransDiff decoder's bf16 cast of the
time-projection input (a no-op under the bf16 autocast it trains in) is skipped, exactly as in `side_by_side.py`.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.side_by_side import (
    _fp32_timestep_embedder,
    cuda_as_noop,
    import_official,
    load_ours_into,
    perturb_,
    small_official_tokenizer_config,
)
from models.dar_gpt import DARGPT, GPTConfig
from models.dar_tokenizer import DARTokenizer, DARTokenizerConfig
from models.transdiff import TRANSDIFF_CONFIGS, TransDiff

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"

# small configs both codebases accept (the official TransDiff hard-codes a 16x16 latent and 256 encoder tokens)
TRANSDIFF_SMALL = dict(num_classes=10, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                       decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, attn_dropout=0.0,
                       proj_dropout=0.0, diffusion_batch_mul=2)  # fmt: skip
GPT_SMALL = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10)
GPT_DROP = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
DAR_TOKENIZER_OFFICIAL = small_official_tokenizer_config(dim=64, codebook_size=128)
# the official tokenizer hard-codes a 2048/2048/768 REPA projector (7M parameters, unused in eval): not stored
# and neither is the codebook-usage tracker buffer (zeros): the tests take both from a fresh model
SKIP_PREFIX = ("diff_decoder.net.repa_out.", "quantize.codebook_used")


def config_diff(cfg, base) -> dict:
    """The dataclass fields where cfg differs from base (plain python values, safe for weights_only loading)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}


def clean_state(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith(skip)}


@contextmanager
def patched(obj, name: str, value) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


# --------------------------------------------------------------------------------------------------------------------
def transdiff_golden(root: str) -> None:
    mods = import_official(root, ["models.transdiff", "models.transdiff_mrar", "models.diffdecoder"])
    mods["models.diffdecoder"].TimestepEmbedder.forward = _fp32_timestep_embedder
    for mrar, module in ((False, mods["models.transdiff"]), (True, mods["models.transdiff_mrar"])):
        transdiff_mode_golden(mrar, module, mods["models.diffdecoder"])


def transdiff_mode_golden(mrar: bool, module: types.ModuleType, dd_module: types.ModuleType) -> None:
    preset = "transdiff_base_mrar" if mrar else "transdiff_base"
    cfg = replace(TRANSDIFF_CONFIGS[preset], **TRANSDIFF_SMALL)
    torch.manual_seed(0)
    ours = perturb_(TransDiff(cfg)).eval()
    with cuda_as_noop():
        theirs = module.Transdiff(
            encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2,
            decoder_num_heads=2, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), class_num=10,
            attn_dropout=0.0, proj_dropout=0.0, patch_size=cfg.patch_size, diffusion_batch_mul=2,
        )  # fmt: skip
    load_ours_into(theirs, ours)
    if mrar:
        theirs.attention_mask = theirs.attention_mask.float()
    g = torch.Generator().manual_seed(1)
    B = 2
    labels = torch.randint(0, 10, (B,), generator=g)
    n_img = 4 if mrar else 1
    latents = torch.randn(B, n_img, 16, 16, 16, generator=g)
    inputs: dict = {"labels": labels, "latents": latents if mrar else latents[:, 0]}
    outputs: dict = {}
    with torch.no_grad(), cuda_as_noop():
        class_emb = theirs.class_emb(labels)
        # encoder features (MRAR: with 3 reference images, as the official training forward lays them out)
        if mrar:
            tokens = torch.zeros(B, 256, 64)
            for k in range(3):
                tokens[:, 64 * (k + 1) : 64 * (k + 2)] = theirs.patchify(latents[:, k], hw=8, patch_size=2)
            z = theirs.forward_encoder(tokens, class_emb)
            outputs["features"] = z + theirs.diffusion_pos_embed_learned[:, : z.shape[1]]
        else:
            outputs["features"] = theirs.forward_encoder(torch.zeros(B, 256, 16), class_emb)[0]
        # decoder velocity on a given x_t, t
        c = outputs["features"]
        inputs["x_t"] = torch.randn(B, 256, 16, generator=g)
        inputs["t"] = torch.randint(0, 1000, (B,), generator=g)
        outputs["velocity"] = theirs.diffdecoder.net(inputs["x_t"], c, inputs["t"])
        # training loss with every random draw recorded
        draws: list[Tensor] = []
        real_randn_like, real_norm = torch.randn_like, dd_module.norm
        noise_buf: list[Tensor] = []

        def randn_like(x, *a, **kw):
            out = real_randn_like(x, *a, **kw)
            noise_buf.append(out)
            return out

        def rvs(**kw):
            draws.append(torch.cat(noise_buf))  # the noise of this loss term, drawn just before
            noise_buf.clear()
            s = real_norm.rvs(**kw)
            draws.append(torch.tensor(s, dtype=torch.float32))
            return s

        np.random.seed(3)
        torch.manual_seed(3)
        fake_norm = types.SimpleNamespace(rvs=rvs)
        with patched(torch, "randn_like", randn_like), patched(dd_module, "norm", fake_norm):
            if mrar:
                outputs["loss"] = theirs(*[latents[:, k] for k in range(4)], labels)
            else:
                outputs["loss"] = theirs(latents[:, 0], labels)
        inputs["draws"] = draws
        # full CFG sampler, every draw from one seeded CPU generator
        seed = 11
        gen = torch.Generator().manual_seed(seed)
        randn_tensor = lambda shape, generator=None, device=None, dtype=None: torch.randn(shape, generator=gen)
        randn_like_g = lambda x, *a, **kw: torch.randn(x.shape, generator=gen)
        cfg_scale = [1.0, 2.0, 3.0, 1.5] if mrar else 2.5
        steps = 4
        with patched(module, "randn_tensor", randn_tensor), patched(torch, "randn_like", randn_like_g):
            outputs["sample"] = theirs.samples(labels, num_sampling_steps=steps, cfg=cfg_scale, scale_0=1.0,
                                               scale_1=0.9)  # fmt: skip
        inputs.update(seed=seed, cfg=cfg_scale, num_steps=steps, scale_0=1.0, scale_1=0.9)
    name = "transdiff_mrar" if mrar else "transdiff"
    save(name, {"preset": preset, "config": config_diff(cfg, TRANSDIFF_CONFIGS[preset]),
                "state_dict": clean_state(ours), "inputs": inputs, "outputs": outputs})  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
def dar_golden(root: str) -> None:
    mods = import_official(root, ["autoregressive.models.gpt", "autoregressive.models.generate",
                                  "tokenizer.tokenizer_image.vq_model"])  # fmt: skip
    gpt_mod, gen_mod = mods["autoregressive.models.gpt"], mods["autoregressive.models.generate"]
    vq_mod = mods["tokenizer.tokenizer_image.vq_model"]

    # ---- GPT
    torch.manual_seed(0)
    gcfg = GPTConfig(**GPT_SMALL, **GPT_DROP, multiple_of=256)
    ours = perturb_(DARGPT(gcfg)).eval()
    theirs = load_ours_into(gpt_mod.Transformer(gpt_mod.ModelArgs(**GPT_SMALL, **GPT_DROP)), ours)
    g = torch.Generator().manual_seed(1)
    B, N = 3, GPT_SMALL["block_size"]
    tokens = torch.randint(0, GPT_SMALL["vocab_size"], (B, N), generator=g)
    labels = torch.randint(0, 10, (B,), generator=g)
    inputs: dict = {"tokens": tokens, "labels": labels}
    outputs: dict = {}
    with torch.no_grad():
        theirs.train()  # its teacher-forcing path runs in train mode only; all dropouts 0, label dropout off here
        theirs.cls_embedding.dropout_prob = 0.0
        outputs["logits"] = theirs(tokens[:, :-1], labels)[0]
        theirs.eval()
        theirs.setup_caches(max_batch_size=B, max_seq_length=N + 1, dtype=torch.float32)
        out = [theirs(None, labels, input_pos=torch.tensor([0]))[0]]
        out += [theirs(tokens[:, i : i + 1], None, input_pos=torch.tensor([i + 1]))[0] for i in range(N - 1)]
        outputs["logits_kv"] = torch.cat(out, dim=1)
        theirs.cls_embedding.dropout_prob = 0.1

        samples = {}
        for name, kw in {
            "cfg_topk_topp": dict(cfg_scale="1.5,4.0", top_k=20, top_p=0.9, temperature=1.0),
            "cfg_from_1": dict(cfg_scale="1.0,3.0", top_k=0, top_p=1.0, temperature=0.8),
            "no_cfg": dict(cfg_scale=1.0, top_k=0, top_p=1.0, temperature=1.0),
        }.items():
            gen = torch.Generator().manual_seed(5)

            def multinomial(probs, num_samples=1, gen=gen):
                u = torch.rand(probs.shape[0], 1, generator=gen)
                return (probs.cumsum(-1) < u).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)

            with patched(torch, "multinomial", multinomial):
                seq = gen_mod.generate(theirs, labels, N, cfg_scale=kw["cfg_scale"], temperature=kw["temperature"],
                                       top_k=kw["top_k"], top_p=kw["top_p"], sample_logits=True)  # fmt: skip
            samples[name] = {**{k: v for k, v in kw.items()}, "tokens": seq.long()}
        inputs["seed"] = 5
        outputs["samples"] = samples
    save("dar_gpt", {"config": config_diff(gcfg, GPTConfig()), "state_dict": clean_state(ours), "inputs": inputs,
                     "outputs": outputs})  # fmt: skip

    # ---- tokenizer
    tcfg = DARTokenizerConfig.from_official(DAR_TOKENIZER_OFFICIAL)
    torch.manual_seed(0)
    ours_tok = perturb_(DARTokenizer(tcfg)).eval()
    theirs_tok = load_ours_into(vq_mod.VQModel(DAR_TOKENIZER_OFFICIAL), ours_tok)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    seed = 7
    with torch.no_grad():
        ids = theirs_tok.extract_code(images).long()
        torch.manual_seed(seed)
        decoded = theirs_tok.decode_code(ids, height=64, width=64)
        previews = []
        for k in range(1, tcfg.num_groups + 1):
            torch.manual_seed(seed)
            previews.append(theirs_tok.decode_code(ids, height=64, width=64, clip_steps=k))
    save("dar_tokenizer", {
        "config": config_diff(tcfg, DARTokenizerConfig()), "state_dict": clean_state(ours_tok, SKIP_PREFIX),
        "inputs": {"images": images, "seed": seed},
        "outputs": {"ids": ids, "decode": decoded, "previews": torch.stack(previews)},
    })  # fmt: skip


def save(name: str, obj: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.pt"
    torch.save(obj, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-transdiff", help="root of a clone of github.com/TransDiff/TransDiff")
    p.add_argument("--official-dar", help="root of a clone of github.com/showlab/D-AR")
    args = p.parse_args(argv)
    if not (args.official_transdiff or args.official_dar):
        p.error("pass --official-transdiff PATH and/or --official-dar PATH")
    torch.set_num_threads(1)
    if args.official_transdiff:
        transdiff_golden(args.official_transdiff)
    if args.official_dar:
        dar_golden(args.official_dar)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Our models next to the official code: same config, OUR random weights loaded into THEIR classes, same inputs.

Point the flags at your own clones (nothing of the official code is part of ardiff):

    git clone https://github.com/TransDiff/TransDiff /tmp/official/TransDiff   # needs diffusers (+ transformers: MRAR)
    git clone https://github.com/showlab/D-AR /tmp/official/D-AR
    python -m benchmarks.side_by_side --official-transdiff /tmp/official/TransDiff --official-dar /tmp/official/D-AR

For each model the script builds a small config both codebases accept (the official TransDiff hard-codes a 16x16
latent, 256 encoder tokens and 64-token MRAR blocks; the D-AR tokenizer hard-codes head_dim 64, 1024-row query
tables and a 2048/768 REPA projector), perturbs our freshly initialised weights (the zero-initialised heads would
make every output trivially equal), loads `state_dict()` into the official model with `strict=True` (exact key and
shape match), and compares in eval mode, fp32, on the same inputs (and the same noise where noise is drawn):

    TransDiff / MRAR: encoder features c, decoder velocity v(x_t, c, t)
    D-AR:             GPT logits (teacher forcing, and step by step with the KV cache), tokenizer token ids,
                      tokenizer decode (8-step AB2 from the same initial noise)

Each row prints our time, their time (median of `--iters` calls) and the max |ours - theirs|. The official code calls
`.cuda()`; on CPU those calls are made no-ops while the official code runs (no file of theirs is edited), and the
official TransDiff decoder's `time_proj(act(temb).to(bfloat16))` cast, a no-op under the bf16 autocast it trains in,
is skipped so the fp32 comparison runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import report, time_fn
from models.dar_gpt import DARGPT, GPTConfig, KVCache
from models.dar_tokenizer import DARTokenizer, DARTokenizerConfig
from models.transdiff import TRANSDIFF_CONFIGS, TransDiff


def small_official_tokenizer_config(dim: int, codebook_size: int) -> dict[str, Any]:
    """A small D-AR tokenizer config in the official yaml layout (`VQModel(**cfg)`): 64 px, 32 queries in 8 groups."""
    return {
        "encoder_patch_size": 16, "encoder_dim": dim, "decoder_dim": dim, "num_encoder_layers": 1,
        "num_decoder_layers": 1, "query_low_rank": True, "vq_dim": 8, "vq_codebook_size": codebook_size,
        "num_denoising_steps": 8, "num_query_groups": 8, "num_all_queries": 32, "queries_per_step": 4,
        "vq_enable": True, "sampling_resolution": 64,
        "diff_decoder": {"in_dim": 3, "out_dim": 3, "dim": dim, "cond_dim": dim, "patch_size": 8, "depth": 2,
                         "data_std": 0.6, "time_shift": 2, "mlp_head": False, "share_time_encoding": False},
    }  # fmt: skip


COLUMNS = ["model", "output", "shape", "ours_ms", "theirs_ms", "ours_over_theirs", "max_abs_diff", "max_abs_ref"]


class OfficialCodeError(RuntimeError):
    """The official code path is missing, incomplete, or its model does not take our weights."""


@contextmanager
def cuda_as_noop() -> Iterator[None]:
    """`Tensor.cuda()` / `Module.cuda()` return self while the official (CUDA-only) code runs on CPU."""
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


def import_official(root: str | Path, modules: list[str]) -> dict[str, Any]:
    """Import `modules` from the official checkout `root` in one go (so they share their own submodules), without
    disturbing ardiff's packages: TransDiff and ardiff both have a top-level `models`. Every top-level name the
    checkout defines is taken out of sys.modules for the import and put back afterwards."""
    root = Path(root).expanduser().resolve()
    missing = [m for m in modules if not (root / (m.replace(".", "/") + ".py")).is_file()]
    if missing:
        raise OfficialCodeError(
            f"{root} has no {', '.join(m.replace('.', '/') + '.py' for m in missing)}: pass the root of a clone of "
            "the official repository."
        )
    tops = {p.stem for p in root.iterdir() if p.is_dir() or p.suffix == ".py"}
    in_checkout = lambda name: name.split(".")[0] in tops
    shadowed = {k: v for k, v in sys.modules.items() if in_checkout(k)}
    for k in shadowed:
        del sys.modules[k]
    for top in {m.split(".")[0] for m in modules}:  # their folders have no __init__.py: pin them as packages, so an
        package = types.ModuleType(top)  # installed package of the same name (ardiff's `models`) cannot win
        package.__path__ = [str(root / top)]
        sys.modules[top] = package
    sys.path.insert(0, str(root))
    try:
        with cuda_as_noop():
            return {m: importlib.import_module(m) for m in modules}
    except ImportError as e:
        raise OfficialCodeError(f"importing {modules} from {root} failed: {e} (install what it needs)") from e
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if in_checkout(k)]:
            del sys.modules[k]
        sys.modules.update(shadowed)


def perturb_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Add N(0, std^2) to every parameter, so zero-initialised layers (heads, adaLN) carry signal too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def load_ours_into(theirs: nn.Module, ours: nn.Module) -> nn.Module:
    """Exact key and shape match, or an error listing the differences."""
    sd, target = ours.state_dict(), theirs.state_dict()
    missing, unexpected = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
    shapes = [f"{k}: ours {tuple(sd[k].shape)} vs theirs {tuple(target[k].shape)}"
              for k in sorted(set(sd) & set(target)) if sd[k].shape != target[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise OfficialCodeError(
            f"state dicts differ: only in theirs {missing}; only in ours {unexpected}; shape mismatches {shapes}"
        )
    theirs.load_state_dict(sd, strict=True)
    return theirs.eval()


def compare(model: str, output: str, ours: Callable[[], Tensor], theirs: Callable[[], Tensor], iters: int) -> dict:
    with torch.no_grad(), cuda_as_noop():
        a, b = ours().float(), theirs().float()
        t_ours = time_fn(ours, warmup=0, iters=iters)
        t_theirs = time_fn(theirs, warmup=0, iters=iters)
    if a.shape != b.shape:
        raise OfficialCodeError(f"{model} {output}: ours has shape {tuple(a.shape)}, theirs {tuple(b.shape)}")
    return {
        "model": model,
        "output": output,
        "shape": "x".join(map(str, a.shape)),
        "ours_ms": 1e3 * t_ours,
        "theirs_ms": 1e3 * t_theirs,
        "ours_over_theirs": t_ours / t_theirs,
        "max_abs_diff": (a - b).abs().max().item(),
        "max_abs_ref": b.abs().max().item(),
    }


# --------------------------------------------------------------------------------------------------------------------
# TransDiff / MRAR
# --------------------------------------------------------------------------------------------------------------------
def transdiff_rows(root: str, batch: int, iters: int) -> list[dict]:
    mods = import_official(root, ["models.transdiff", "models.transdiff_mrar", "models.diffdecoder"])
    official = {"1-step": mods["models.transdiff"], "MRAR": mods["models.transdiff_mrar"]}
    # the time_proj input cast to bf16 (a no-op under the bf16 autocast the official code trains in) breaks fp32
    mods["models.diffdecoder"].TimestepEmbedder.forward = _fp32_timestep_embedder

    return [row for mode, module in official.items() for row in transdiff_mode_rows(mode, module, batch, iters)]


def transdiff_mode_rows(mode: str, module: Any, batch: int, iters: int) -> list[dict]:
    mrar = mode == "MRAR"
    # a small config the official code accepts: 256 px (16x16 latent), 256 encoder tokens, buffer 64
    cfg = replace(TRANSDIFF_CONFIGS["transdiff_base_mrar" if mrar else "transdiff_base"], num_classes=10,
                  encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=64,
                  decoder_depth=2, decoder_num_heads=4, attn_dropout=0.0, proj_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    ours = perturb_(TransDiff(cfg)).eval()
    with cuda_as_noop():  # the official encoder_depth counts pairs of blocks
        theirs = module.Transdiff(
            encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2,
            decoder_num_heads=4, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), class_num=10,
            attn_dropout=0.0, proj_dropout=0.0, patch_size=cfg.patch_size,
        )  # fmt: skip
    load_ours_into(theirs, ours)
    if mrar:  # the official mask is an additive bf16 mask for bf16 attention; fp32 attention needs it in fp32
        theirs.attention_mask = theirs.attention_mask.float()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (batch,), generator=g)
    class_emb = ours.class_emb(labels)  # (B, D)
    name, refs = f"TransDiff {mode}", None
    if mrar:
        latents = torch.randn(batch, 3, 16, 16, 16, generator=g)  # 3 reference latents
        refs = torch.stack([ours.patchify(latents[:, k], 2) for k in range(3)], dim=1)  # (B, 3, 64, 64)
        tokens = torch.zeros(batch, 256, 64)
        tokens[:, 64:] = refs.flatten(1, 2)  # official layout: [mask block][ref_0][ref_1][ref_2]

        def their_encoder() -> Tensor:
            z = theirs.forward_encoder(tokens, class_emb)
            return z + theirs.diffusion_pos_embed_learned[:, : z.shape[1]]

        output = "encoder features (3 refs)"
    else:
        their_encoder = lambda: theirs.forward_encoder(torch.zeros(batch, 256, 16), class_emb)[0]
        output = "encoder features"
    rows = [compare(name, output, lambda: ours.forward_encoder(class_emb, refs), their_encoder, iters)]
    with torch.no_grad():
        c = ours.forward_encoder(class_emb, refs)  # (B, M, D)
    x_t = torch.randn(batch, 256, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ours_v, theirs_v = lambda: ours.diffdecoder.net(x_t, c, t), lambda: theirs.diffdecoder.net(x_t, c, t)
    rows.append(compare(name, f"decoder velocity (c: {c.shape[1]} tokens)", ours_v, theirs_v, iters))
    return rows


def _fp32_timestep_embedder(self: nn.Module, t: Tensor) -> tuple[Tensor, Tensor]:
    temb = self.time_embedder(self.timesteps_proj(t))
    return temb, self.time_proj(self.act_fn(temb))


# --------------------------------------------------------------------------------------------------------------------
# D-AR
# --------------------------------------------------------------------------------------------------------------------
def dar_rows(root: str, batch: int, iters: int) -> list[dict]:
    mods = import_official(root, ["autoregressive.models.gpt", "tokenizer.tokenizer_image.vq_model"])
    gpt_mod, vq_mod = mods["autoregressive.models.gpt"], mods["tokenizer.tokenizer_image.vq_model"]
    rows = []

    # ---- GPT (LlamaGen Transformer, 1D RoPE)
    size = dict(dim=128, n_layer=2, n_head=4, vocab_size=256, block_size=32, num_classes=10)
    drop = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    torch.manual_seed(0)
    ours = perturb_(DARGPT(GPTConfig(**size, **drop, multiple_of=256))).eval()
    theirs = load_ours_into(gpt_mod.Transformer(gpt_mod.ModelArgs(**size, **drop)), ours)
    theirs.train()  # its teacher-forcing path only runs in train mode; dropouts are 0, label dropout off:
    theirs.cls_embedding.dropout_prob = 0.0  # (the null-class row stays: the table was built with p = 0.1)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (batch, 32), generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    rows.append(compare("D-AR GPT", "logits, teacher forcing", lambda: ours(tokens, labels),
                        lambda: theirs(tokens[:, :-1], labels)[0], iters))  # fmt: skip

    def ours_cached() -> Tensor:
        caches = [KVCache() for _ in ours.layers]
        out = [ours.transformer(ours.cls_embedding(labels), 0, caches)]
        out += [ours.transformer(ours.tok_embeddings(tokens[:, i : i + 1]), i + 1, caches) for i in range(31)]
        return torch.cat(out, dim=1)

    def theirs_cached() -> Tensor:
        theirs.eval()
        theirs.setup_caches(max_batch_size=batch, max_seq_length=33, dtype=torch.float32)
        out = [theirs(None, labels, input_pos=torch.tensor([0]))[0]]
        out += [theirs(tokens[:, i : i + 1], None, input_pos=torch.tensor([i + 1]))[0] for i in range(31)]
        return torch.cat(out, dim=1)

    rows.append(compare("D-AR GPT", "logits, KV cache step by step", ours_cached, theirs_cached, iters))

    # ---- tokenizer: our config made from the official yaml dict, as `load_dar_tokenizer` does
    official_cfg = small_official_tokenizer_config(dim=128, codebook_size=256)
    cfg = DARTokenizerConfig.from_official(official_cfg)
    torch.manual_seed(0)
    ours_tok = perturb_(DARTokenizer(cfg)).eval()
    theirs_tok = load_ours_into(vq_mod.VQModel(official_cfg), ours_tok)
    images = torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1
    rows.append(compare("D-AR tokenizer", "token ids (0 = all equal)", lambda: ours_tok.encode_tokens(images),
                        lambda: theirs_tok.extract_code(images), iters))  # fmt: skip
    ids = ours_tok.encode_tokens(images)

    def theirs_decode() -> Tensor:
        torch.manual_seed(7)  # their initial noise: the first draw of the global generator
        return theirs_tok.decode_code(ids, height=64, width=64)

    ours_decode = lambda: ours_tok.decode_tokens(ids, torch.Generator().manual_seed(7))
    rows.append(compare("D-AR tokenizer", "decode (8-step AB2, same noise)", ours_decode, theirs_decode, iters))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-transdiff", help="root of a clone of github.com/TransDiff/TransDiff")
    p.add_argument("--official-dar", help="root of a clone of github.com/showlab/D-AR")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed calls per side (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="side_by_side.json")
    args = p.parse_args(argv)
    if not (args.official_transdiff or args.official_dar):
        p.error("pass --official-transdiff PATH and/or --official-dar PATH (your clones of the official code)")
    torch.set_num_threads(args.threads)
    rows = []
    if args.official_transdiff:
        rows += transdiff_rows(args.official_transdiff, args.batch, args.iters)
    if args.official_dar:
        rows += dar_rows(args.official_dar, args.batch, args.iters)
    report(rows, args.json, "ardiff vs official code (fp32, same weights and inputs)", COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

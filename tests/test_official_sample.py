"""Released weights -> samples npz -> `ardiff eval` in one command per step: `ardiff sample --preset` reads official
TransDiff, MRAR and D-AR (GPT + tokenizer) files, written here as the official training scripts write them (tiny
sizes): TransDiff `main.py` saves {model, model_ema, optimizer, epoch, args: argparse.Namespace}; D-AR
`train_c2i.py` {model (torch.compile `_orig_mod.` keys), optimizer, steps, args}; the tokenizer trainer {model, ema,
optimizer, steps, args}."""

from __future__ import annotations

import argparse
import contextlib
import io

import numpy as np
import pytest
import torch

from ardiff import evaluate, sample
from ardiff.official import PRESETS, load_official
from models.dar_gpt import DAR_GPT_CONFIGS, DARGPT
from models.dar_tokenizer import DAR_TOKENIZER_CONFIGS, DARTokenizer
from models.transdiff import build_transdiff


def randomize(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v.clone() for k, v in sd.items()}


def optimizer_state(model: torch.nn.Module) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return opt.state_dict()


def write_transdiff(path, arch: str) -> tuple[dict, dict]:
    model = build_transdiff(arch)
    online, ema = randomize(model.state_dict(), 0), randomize(model.state_dict(), 1)
    args = argparse.Namespace(model=f"transdiff_{arch}", mrar="mrar" in arch, blr=1e-4, ema_rate=0.9999, epochs=800)
    torch.save({"model": online, "model_ema": ema, "optimizer": optimizer_state(model), "epoch": 4, "args": args}, path)
    return online, ema


def write_dar(tmp_path) -> tuple[str, str]:
    gpt = DARGPT(DAR_GPT_CONFIGS["tiny"])
    sd = {"_orig_mod." + k: v for k, v in randomize(gpt.state_dict(), 2).items()}
    gpt_path = tmp_path / "D-AR-tiny.pt"
    args = argparse.Namespace(gpt_model="GPT-tiny", global_batch_size=1024, lr=4e-4)
    torch.save({"model": sd, "optimizer": optimizer_state(gpt), "steps": 360000, "args": args}, gpt_path)
    tok = DARTokenizer(DAR_TOKENIZER_CONFIGS["tiny"])
    tsd = tok.state_dict()
    tok_path = tmp_path / "D-AR-tokenizer_tiny.pt"
    targs = argparse.Namespace(global_batch_size=1024, ema=True)
    torch.save({"model": tsd, "ema": tsd, "optimizer": optimizer_state(tok), "steps": 10, "args": targs}, tok_path)
    return str(gpt_path), str(tok_path)


def run_sample(*argv: str) -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        assert sample.main(list(argv)) == 0


@pytest.mark.parametrize("arch", ["tiny", "tiny_mrar"])
def test_official_transdiff_file_to_npz(tmp_path, arch):
    ckpt = tmp_path / "checkpoint-last.pth"
    online, ema = write_transdiff(ckpt, arch)
    out = tmp_path / "samples.npz"
    run_sample("--preset", f"transdiff_{arch}", "--ckpt", str(ckpt), "--num-samples", "4", "--chunk-size", "2",
               "--set", "num_steps=2", "--out", str(out))  # fmt: skip
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [0, 2, 5, 7]  # class-balanced plan over 10 classes
    module = load_official(f"transdiff_{arch}", str(ckpt))
    # the EMA weights, not the online ones, and the preset's sampling settings (official evaluation)
    assert torch.equal(module.net.state_dict()["fake_latent"], ema["fake_latent"])
    assert not torch.equal(module.net.state_dict()["fake_latent"], online["fake_latent"])
    assert module.sample_kwargs["cfg"] == PRESETS[f"transdiff_{arch}"].sample["cfg"]


def test_official_dar_files_to_npz_to_eval(tmp_path, inception_weights, fast_inception):
    gpt_path, tok_path = write_dar(tmp_path)
    out = tmp_path / "samples.npz"
    run_sample("--preset", "dar_tiny", "--ckpt", gpt_path, "--tokenizer", tok_path, "--num-samples", "4",
               "--chunk-size", "4", "--out", str(out))  # fmt: skip
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 32, 32, 3)
    module = load_official("dar_tiny", gpt_path, tokenizer=tok_path)
    saved = torch.load(gpt_path, weights_only=False)["model"]
    assert torch.equal(module.net.state_dict()["tok_embeddings.weight"], saved["_orig_mod.tok_embeddings.weight"])
    # npz -> `ardiff eval` (random Inception weights here; the reference: statistics of the same samples)
    ref = tmp_path / "ref.npz"
    common = ["--inception-weights", inception_weights, "--batch-size", "4"]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        assert evaluate.main([str(out), "--write-ref", str(ref), "--no-features", *common]) == 0
        assert evaluate.main([str(out), "--ref", str(ref), "--no-is", *common]) == 0
    assert "fid" in text.getvalue().lower()


def test_preset_errors_name_the_fix(tmp_path):
    ckpt = tmp_path / "checkpoint-last.pth"
    write_transdiff(ckpt, "tiny")
    with pytest.raises(SystemExit, match="--vae"):
        load_official("transdiff_large", str(ckpt))
    with pytest.raises(SystemExit, match="--tokenizer"):
        load_official("dar_L", str(ckpt))
    with pytest.raises(SystemExit, match="choose one of"):
        load_official("transdiff_giant", str(ckpt))

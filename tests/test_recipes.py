"""Recipes say each fact once: `include:` composition, OmegaConf interpolation over the merged config, and
`--print_config` showing the resolved architecture (depth, width), not only the preset's name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ardiff.cli import expand_includes
from tests.test_cli import ardiff_inprocess

ROOT = Path(__file__).resolve().parents[1]

# depth / width of the released architectures (papers: TransDiff-B/L/H 768/1024/1280 wide; LlamaGen GPT-L 24 x 1024,
# GPT-XL 36 x 1280; D-AR tokenizer v1 8 + 8 layers of width 768)
EXPECTED = {
    "transdiff/transdiff_base.yaml": ("arch", {"encoder_depth": 24, "encoder_embed_dim": 768, "decoder_depth": 12}),
    "transdiff/transdiff_large.yaml": ("arch", {"encoder_depth": 32, "encoder_embed_dim": 1024, "decoder_depth": 16}),
    "transdiff/transdiff_huge.yaml": ("arch", {"encoder_depth": 40, "encoder_embed_dim": 1280, "decoder_depth": 20}),
    "transdiff/transdiff_large_mrar.yaml": ("arch", {"encoder_depth": 32, "encoder_embed_dim": 1024, "mrar": True}),
    "dar/gpt_L.yaml": ("gpt", {"n_layer": 24, "dim": 1024, "n_head": 16}),
    "dar/gpt_XL.yaml": ("gpt", {"n_layer": 36, "dim": 1280, "n_head": 20}),
    "dar/tokenizer_v1.yaml": ("config", {"width": 768, "num_encoder_layers": 8, "num_decoder_layers": 8}),
}


def print_config(*args: str) -> dict:
    proc = ardiff_inprocess("fit", "--print_config", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_print_config_shows_resolved_architecture(recipe):
    key, fields = EXPECTED[recipe]
    cfg = print_config("-c", str(ROOT / "experiments" / recipe))
    arch = cfg["model"]["init_args"][key]
    assert isinstance(arch, dict), f"{recipe}: {key} printed as {arch!r}, not as its fields"
    assert {k: arch[k] for k in fields} == fields


def test_size_recipes_state_only_what_differs():
    """The three TransDiff sizes include one base and differ from each other only in size and sampling settings."""
    sizes = {s: yaml.safe_load((ROOT / f"experiments/transdiff/transdiff_{s}.yaml").read_text()) for s in
             ("base", "large", "huge")}  # fmt: skip
    for s, recipe in sizes.items():
        assert recipe["include"] == "base.yaml"
        assert set(recipe["model"]["init_args"]) == {"arch", "cfg", "scale_0", "scale_1"}, s
        assert recipe["trainer"] == {"default_root_dir": f"runs/transdiff_{s}"}


def test_interpolation_follows_an_override():
    """image size and class count are written once (in the architecture): the data follows a changed arch."""
    recipe = str(ROOT / "experiments/transdiff/transdiff_large.yaml")
    cfg = print_config("-c", recipe, "--model.init_args.arch", "transdiff_large_512")
    assert cfg["model"]["init_args"]["arch"]["img_size"] == 512
    assert cfg["data"]["init_args"]["image_size"] == 512
    cfg = print_config("-c", recipe, "--model.init_args.arch", "{preset: transdiff_large, num_classes: 10}")
    assert cfg["data"]["init_args"]["num_classes"] == 10
    assert cfg["model"]["init_args"]["arch"]["encoder_depth"] == 32  # the other fields stay the preset's


def test_shard_root_and_max_steps_written_once():
    recipe = str(ROOT / "experiments/dar/gpt_XL.yaml")
    cfg = print_config("-c", recipe, "--vars", "{shards: /mnt/imnet}", "--trainer.max_steps", "1000")
    assert cfg["data"]["init_args"]["train_shards"] == "/mnt/imnet/train"
    assert cfg["data"]["init_args"]["val_shards"] == "/mnt/imnet/val"
    assert cfg["model"]["init_args"]["total_steps"] == 1000


def test_include_composes_like_two_config_flags(tmp_path):
    base = ROOT / "experiments/transdiff/base.yaml"
    size = yaml.safe_load((ROOT / "experiments/transdiff/transdiff_huge.yaml").read_text())
    del size["include"]
    explicit = tmp_path / "huge_only.yaml"
    explicit.write_text(yaml.safe_dump(size))
    a = print_config("-c", str(ROOT / "experiments/transdiff/transdiff_huge.yaml"))
    b = print_config("-c", str(base), "-c", str(explicit))
    assert a == b
    assert a["model"]["init_args"]["cfg"] == 1.23 and a["data"]["init_args"]["batch_size"] == 32


def test_include_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("include: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="bad.yaml.*missing.yaml"):
        expand_includes(["fit", "-c", str(bad)])
    loop = tmp_path / "loop.yaml"
    loop.write_text("include: loop.yaml\n")
    with pytest.raises(ValueError, match="include cycle"):
        expand_includes(["fit", "-c", str(loop)])


def test_resolved_arch_is_stored_as_plain_fields():
    """A module built from a resolved config keeps plain values in its hparams (checkpoints load weights_only)."""
    from lightning_modules.transdiff import TransDiffModule
    from models.presets import resolve_config
    from models.transdiff import TRANSDIFF_CONFIGS, TransDiffConfig

    cfg = resolve_config(TransDiffConfig, TRANSDIFF_CONFIGS, {"preset": "tiny", "encoder_depth": 2})
    module = TransDiffModule(arch=cfg, vae="identity")
    assert module.hparams["arch"]["encoder_depth"] == 2 and isinstance(module.hparams["arch"], dict)
    assert len(module.net.encoder_blocks) == 2
    again = TransDiffModule(**module.hparams)
    assert again.net.cfg == module.net.cfg


def test_sample_reads_the_model_of_an_included_recipe():
    """`ardiff sample --config RECIPE` sees the merged, resolved model section (includes and ${...})."""
    from ardiff.cli import recipe_model_section

    model = recipe_model_section(str(ROOT / "experiments/dar/gpt_XL.yaml"))
    assert model["class_path"] == "lightning_modules.dar.DARGPTModule"
    assert model["init_args"]["gpt"] == "XL" and model["init_args"]["cfg_end"] == 10.0
    assert model["init_args"]["total_steps"] == 360000  # ${trainer.max_steps} of gpt_common.yaml

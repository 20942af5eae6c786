"""Named architecture presets: one function turns a preset name, a dict of fields or a config into the config.

The CLI (`ardiff/cli.py`) registers every preset-backed config class with jsonargparse through `preset_types()`, so
a recipe may write `arch: transdiff_large` or `arch: {preset: transdiff_large, encoder_depth: 4}` and
`ardiff fit --print_config` shows the resolved fields (depth, width, ...), not only the preset's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")


def resolve_config(
    cls: type[C], presets: dict[str, C], value: str | dict[str, Any] | C, overrides: dict[str, Any] | None = None
) -> C:
    """A preset name, a dict (`preset:` plus fields, or all fields) or a `cls` instance -> a `cls`, then overrides."""
    if isinstance(value, cls):
        cfg = value
    elif isinstance(value, str):
        if value not in presets:
            raise ValueError(f"unknown {cls.__name__} preset {value!r}; choose one of: {', '.join(presets)}")
        cfg = presets[value]
    elif isinstance(value, dict):
        fields = dict(value)
        preset = fields.pop("preset", None)
        base = resolve_config(cls, presets, preset) if preset is not None else cls()
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
        cfg = dataclasses.replace(base, **fields)
    else:
        raise TypeError(f"expected a {cls.__name__} preset name, dict or instance, got {type(value).__name__}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    """The fields of a config dataclass as plain values (what hyperparameters and checkpoints store)."""
    return dataclasses.asdict(cfg)


def preset_types() -> list[tuple[type, dict[str, Any]]]:
    """(config class, presets) of every model family, for the CLI to register."""
    from models.dar_gpt import DAR_GPT_CONFIGS, GPTConfig
    from models.dar_tokenizer import DAR_TOKENIZER_CONFIGS, DARTokenizerConfig
    from models.transdiff import TRANSDIFF_CONFIGS, TransDiffConfig

    return [
        (TransDiffConfig, TRANSDIFF_CONFIGS),
        (GPTConfig, DAR_GPT_CONFIGS),
        (DARTokenizerConfig, DAR_TOKENIZER_CONFIGS),
    ]

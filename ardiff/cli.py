"""The `ardiff` command.

    ardiff fit|validate|test|predict -c experiments/<model>/<file>.yaml [--key value ...]   (LightningCLI)
    ardiff data write-shards|demo|cache-latents|cache-tokens ...                         (data preparation)
    ardiff judge train SHARDS                                                             (judge classifier)
    ardiff sample ...  |  ardiff eval ...  |  ardiff convert-ckpt ...

Any LightningModule / LightningDataModule of the project can be named in YAML by `class_path`.
"""

from __future__ import annotations

import importlib
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from models.checkpoint import check_checkpoint_file

# "command words" -> "module:function"; each function is `main(argv: list[str]) -> int` with its own argparse.
SUBCOMMANDS: dict[tuple[str, ...], str] = {
    ("data", "write-shards"): "datamodules.shards:main",
    ("data", "demo"): "datamodules.demo:main",
    ("data", "cache-latents"): "datamodules.cache:main_cache_latents",
    ("data", "cache-tokens"): "datamodules.cache:main_cache_tokens",
    ("judge", "train"): "callbacks.judge:main_train",
    ("sample",): "ardiff.sample:main",
    ("eval",): "ardiff.evaluate:main",
    ("convert-ckpt",): "ardiff.convert:main",
}


class ArdiffCLI(LightningCLI):
    """LightningCLI in subclass mode; checks a resume checkpoint up front, prints where logs and checkpoints went."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the resume checkpoint's hyperparameters while parsing: check the file first, so a
        # cut-off file gets a clear message instead of a zip-reader error
        ckpt = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt and ckpt not in ("last", "hpc", "best", "registry"):
            check_checkpoint_file(ckpt)
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        rank_zero_info(f"[ardiff] logs (TensorBoard): {trainer.log_dir}")
        if last:
            rank_zero_info(f"[ardiff] checkpoint: {last}")


def _usage() -> str:
    lines = ["usage: ardiff {fit,validate,test,predict} -c CONFIG.yaml [...]   (LightningCLI; --help for details)"]
    lines += [f"       ardiff {' '.join(words)} [--help]" for words in SUBCOMMANDS]
    return "\n".join(lines)


def run_subcommand(argv: list[str]) -> int | None:
    """Run a non-Lightning subcommand if `argv` names one; None when it does not."""
    for words, target in SUBCOMMANDS.items():
        if tuple(argv[: len(words)]) == words:
            module, func = target.split(":")
            return int(getattr(importlib.import_module(module), func)(argv[len(words) :]) or 0)
    if argv and argv[0] in ("data", "judge"):
        names = ", ".join(w[1] for w in SUBCOMMANDS if w[0] == argv[0])
        print(f"ardiff {argv[0]}: unknown or missing command {argv[1:2]}; choose one of: {names}", file=sys.stderr)
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    code = run_subcommand(argv)
    if code is not None:
        return code
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere+; no effect on CPU
    ArdiffCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=None if from_shell else argv,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

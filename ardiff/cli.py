"""The `ardiff` command.

    ardiff fit|validate|test|predict -c experiments/<model>/<file>.yaml [--key value ...]   (LightningCLI)
    ardiff data write-shards|demo|cache-latents|cache-tokens ...                         (data preparation)
    ardiff judge train SHARDS                                                             (judge classifier)
    ardiff sample ...  |  ardiff eval ...  |  ardiff convert-ckpt ...

Any LightningModule / LightningDataModule of the project can be named in YAML by `class_path`.

Recipes are read with OmegaConf interpolation resolved over the whole merged config (jsonargparse "omegaconf+"), so
a fact is written once and referenced: `${data.init_args.image_size}`, `${vars.data_root}/train`,
`${trainer.default_root_dir}`. `vars:` holds free values that only serve interpolation. A recipe may start with
`include: base.yaml` (a path or list, relative to the recipe): the included files are read first, as if given by
earlier `-c` flags. Architecture presets (`arch: transdiff_large`, `gpt: L`, `config: v1`) are resolved while
parsing, so `--print_config` shows their fields; `{preset: NAME, field: value}` changes single fields.
"""

from __future__ import annotations

import atexit
import glob
import importlib
import os
import socket
import sys
import time
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import set_parsing_settings
from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.precision import BF16Precision
from lightning_modules.strategies import ChecksumCheckpointIO, shutdown_distributed
from models.checkpoint import CheckpointError, check_checkpoint_file
from models.presets import config_dict, preset_types, resolve_config

# A run stopped by SIGTERM/SIGUSR1 (preemption) after saving last.ckpt exits with this code (128 + SIGTERM, what a
# shell reports for a terminated job), so a scheduler can tell it from a finished run (0) and requeue it.
EXIT_PREEMPTED = 143
LOCK_FILE = ".ardiff.lock"

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


def register_presets() -> None:
    """Let jsonargparse read a preset name / field dict into each architecture config and dump it as its fields."""
    for cls, presets in preset_types():

        def deserializer(value: Any, cls: type = cls, presets: dict = presets) -> Any:
            return resolve_config(cls, presets, value)

        register_type(cls, serializer=config_dict, deserializer=deserializer, fail_already_registered=False)


CONFIG_FLAGS = ("-c", "--config")


def _read_recipe(path: str) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def expand_includes(argv: list[str], _seen: tuple[str, ...] = ()) -> list[str]:
    """`-c recipe.yaml` whose YAML has `include: base.yaml` -> `-c base.yaml -c <recipe without include>`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg, value = argv[i], None
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            value, step = argv[i + 1], 2
        elif arg.startswith("--config="):
            value, step = arg.split("=", 1)[1], 1
        if value is None or not os.path.isfile(value):
            out.append(arg)
            i += 1
            continue
        recipe = _read_recipe(value)
        if not (isinstance(recipe, dict) and "include" in recipe):
            out += ["--config", value]
        else:
            path = os.path.abspath(value)
            if path in _seen:
                raise ValueError(f"{value}: include cycle through {' -> '.join(_seen + (path,))}")
            includes = recipe.pop("include")
            for inc in [includes] if isinstance(includes, str) else includes:
                inc_path = os.path.join(os.path.dirname(value), inc)
                if not os.path.isfile(inc_path):
                    raise FileNotFoundError(f"{value}: include {inc!r} not found (looked for {inc_path})")
                out += expand_includes(["--config", inc_path], _seen + (path,))
            out += ["--config", yaml.safe_dump(recipe, sort_keys=False)]
        i += step
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_recipe(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A recipe with its `include:` files merged in (dicts merged, other values replaced), as `-c` would read it."""
    recipe = _read_recipe(path)
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping")
    includes = recipe.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        inc_path = os.path.join(os.path.dirname(path), inc)
        if os.path.abspath(inc_path) in _seen:
            raise ValueError(f"{path}: include cycle through {inc_path}")
        merged = _merge(merged, read_recipe(inc_path, (*_seen, os.path.abspath(path))))
    return _merge(merged, recipe)


def recipe_model_section(path: str) -> dict:
    """The `model:` section of a recipe (or a saved run config), includes merged and `${...}` resolved."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.create(read_recipe(path))
    if "model" not in recipe:
        raise ValueError(f"{path}: no `model:` section")
    return OmegaConf.to_container(recipe.model, resolve=True)


class ArdiffCLI(LightningCLI):
    """LightningCLI in subclass mode with OmegaConf interpolation over the merged recipe; checks a resume
    checkpoint up front, prints where logs and checkpoints went."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--vars", type=dict[str, Any], default={}, help="free values for ${vars.NAME}")
        parser.add_argument(
            "--restart",
            type=bool,
            default=False,
            help="fit from scratch although the checkpoint folder holds an earlier run's last*.ckpt (moved aside "
            "into <folder>/previous-<time>/; nothing is deleted)",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the resume checkpoint's hyperparameters while parsing: check the file first, so a
        # cut-off file gets a clear message instead of a zip-reader error
        ckpt = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt and ckpt not in ("last", "hpc", "best", "registry"):
            check_checkpoint_file(ckpt)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        trainer = self.trainer
        if not isinstance(trainer.strategy.checkpoint_io, ChecksumCheckpointIO):
            trainer.strategy.checkpoint_io = ChecksumCheckpointIO(trainer.strategy.checkpoint_io)
        plugin = trainer.strategy.precision_plugin
        if type(plugin) is MixedPrecision and plugin.precision == "bf16-mixed":  # clips with fused AdamW; CPU attention
            trainer.strategy.precision_plugin = BF16Precision(plugin.device)
        dirs = sorted({cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
        args = self.config[self.config.subcommand]
        if args.get("ckpt_path") == "last":
            check_last_checkpoint(dirs)
        elif args.get("ckpt_path") is None and self.config.subcommand == "fit":
            check_fresh_start(dirs, restart=bool(args.get("restart")), rank=trainer.global_rank)
        if trainer.global_rank == 0:
            for d in dirs:
                acquire_dir_lock(d)

    def after_fit(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        rank_zero_info(f"[ardiff] logs (TensorBoard): {trainer.log_dir}")
        if last:
            rank_zero_info(f"[ardiff] checkpoint: {last}")


def check_last_checkpoint(dirs: list[str]) -> None:
    """`--ckpt_path last`: the newest `last*.ckpt` of the checkpoint folders must be intact; otherwise name it and
    the intact checkpoints beside it."""
    found = [p for d in dirs for p in glob.glob(os.path.join(d, "last*.ckpt"))]
    if not found:
        return  # Lightning starts from scratch (with a warning)
    last = max(found, key=os.path.getmtime)
    try:
        check_checkpoint_file(last)
    except (CheckpointError, OSError) as e:
        folder = os.path.dirname(last)
        intact = []
        for p in sorted(glob.glob(os.path.join(folder, "*.ckpt")), key=os.path.getmtime, reverse=True):
            try:
                if p != last:
                    check_checkpoint_file(p)
                    intact.append(p)
            except (CheckpointError, OSError):
                pass
        hint = (
            "intact checkpoints beside it (newest first): " + ", ".join(intact) + "; resume from one with "
            "--ckpt_path <file>"
            if intact
            else "no intact checkpoint is beside it"
        )
        raise CheckpointError(f"--ckpt_path last: {last!r} cannot be used ({e}); {hint}") from e


def check_fresh_start(dirs: list[str], restart: bool, rank: int = 0) -> None:
    """A fit from scratch into a checkpoint folder that holds an earlier run's `last*.ckpt` is refused: Lightning
    would write `last-v1.ckpt` beside it, and whatever reads `last.ckpt` (a D-AR GPT recipe reads its tokenizer so)
    would silently get the old run. `restart` moves the earlier checkpoints aside instead (rank 0 moves them)."""
    for folder in dirs:
        found = sorted(glob.glob(os.path.join(folder, "*.ckpt")))
        if not any(os.path.basename(p).startswith("last") for p in found):
            continue
        if not restart:
            raise RuntimeError(
                f"checkpoint folder {folder!r} holds an earlier run's checkpoints ({', '.join(found)}). Resume it "
                "with --ckpt_path last, start over with --restart true (moves them into a previous-<time> "
                "subfolder), or give this run another checkpoint dirpath."
            )
        if rank == 0:
            aside = os.path.join(folder, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(aside, exist_ok=True)
            for p in found:
                for f in (p, p + ".sha256"):  # with its checksum file (ChecksumCheckpointIO)
                    if os.path.exists(f):
                        os.replace(f, os.path.join(aside, os.path.basename(f)))
            rank_zero_info(f"[ardiff] --restart: moved {len(found)} earlier checkpoint(s) of {folder!r} to {aside!r}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_dir_lock(folder: str) -> None:
    """Claim `folder` for this run's checkpoints with `<folder>/.ardiff.lock` (pid@host), released at exit.
    Another live run holding it is refused; a lock left by a dead process on this host is taken over."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                owner = f.read().strip()
            if owner == me:
                return  # this process holds it already (a second fit in the same interpreter)
            pid, _, host = owner.partition("@")
            if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                os.remove(path)  # stale: its process is gone
                continue
            raise RuntimeError(
                f"checkpoint folder {folder!r} is in use by another run (process {owner}, lock {path!r}): two runs "
                "would overwrite each other's checkpoints. Give this run another checkpoint dirpath, or delete "
                "the lock file if that run is gone."
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)

        def release(path: str = path, me: str = me) -> None:
            try:
                with open(path) as f:
                    if f.read().strip() == me:
                        os.remove(path)
            except OSError:
                pass

        atexit.register(release)
        return


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
    register_presets()
    # `${data.init_args.image_size}` in a recipe means the key of the recipe, not of the subcommand's parent parser
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    argv = expand_includes(argv)
    if from_shell:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
    try:
        ArdiffCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf+"},
            args=None if from_shell else argv,
        )
    except SIGTERMException:
        rank_zero_info(
            f"[ardiff] stopped by a signal (preempted): exit code {EXIT_PREEMPTED}; resume with --ckpt_path last"
        )
        return EXIT_PREEMPTED
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

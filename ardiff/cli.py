"""The `ardiff` command.

    ardiff fit|validate|test|predict -c experiments/<model>/<file>.yaml [--key value ...]   (LightningCLI)
    ardiff data write-shards|demo|cache-latents|cache-tokens ...                         (data preparation)
    ardiff sample ...  |  ardiff eval ...  |  ardiff convert-ckpt ...

Any LightningModule / LightningDataModule of the project can be named in YAML by `class_path`.
"""

from __future__ import annotations

import atexit
import glob
import importlib
import os
import socket
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.strategies import ChecksumCheckpointIO
from models.checkpoint import CheckpointError, check_checkpoint_file

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

    def before_fit(self) -> None:
        trainer = self.trainer
        if not isinstance(trainer.strategy.checkpoint_io, ChecksumCheckpointIO):
            trainer.strategy.checkpoint_io = ChecksumCheckpointIO(trainer.strategy.checkpoint_io)
        dirs = sorted({cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
        if self.config[self.config.subcommand].get("ckpt_path") == "last":
            check_last_checkpoint(dirs)
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
    if argv and argv[0] == "data":
        names = ", ".join(w[1] for w in SUBCOMMANDS if w[0] == "data")
        print(f"ardiff data: unknown or missing command {argv[1:2]}; choose one of: {names}", file=sys.stderr)
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
    try:
        ArdiffCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None if from_shell else argv,
        )
    except SIGTERMException:
        rank_zero_info(
            f"[ardiff] stopped by a signal (preempted): exit code {EXIT_PREEMPTED}; resume with --ckpt_path last"
        )
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())

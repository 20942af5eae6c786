"""The `ardiff` command: every experiment YAML parses, bad config keys fail before training, subcommands dispatch."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from ardiff.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.yaml"))


def ardiff(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `ardiff ARGS` in a fresh process (for runs that must not share this process's state)."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from ardiff.cli import main; sys.exit(main())", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ardiff_inprocess(*args: str) -> subprocess.CompletedProcess:
    """Run `ardiff ARGS` in this process (parsing-only commands: `--print_config`, `--help`), capturing output."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_there_are_experiments():
    names = {p.relative_to(ROOT / "experiments").as_posix() for p in EXPERIMENTS}
    assert {"transdiff/demo.yaml", "dar/demo_tokenizer.yaml", "dar/demo_gpt.yaml"} <= names


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.relative_to(ROOT / "experiments").as_posix())
def test_print_config_succeeds_for_every_experiment(config):
    proc = ardiff_inprocess("fit", "--print_config", "-c", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class_path" in proc.stdout and "trainer:" in proc.stdout


def test_wrong_config_key_fails_before_training_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "experiments/transdiff/demo.yaml").read_text() + "\ntrainer:\n  max_stepz: 3\n")
    proc = ardiff("fit", "-c", str(bad))
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_wrong_config_type_names_the_key():
    proc = ardiff_inprocess("fit", "-c", str(ROOT / "experiments/transdiff/demo.yaml"), "--trainer.max_steps", "many")
    assert proc.returncode != 0
    assert "max_steps" in proc.stderr


def test_subcommands_resolve_to_functions():
    import importlib

    for target in SUBCOMMANDS.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_usage_and_unknown_data_command(capsys):
    assert main([]) == 2
    assert "ardiff data write-shards" in capsys.readouterr().err
    assert main(["data", "frobnicate"]) == 2
    assert "write-shards" in capsys.readouterr().err

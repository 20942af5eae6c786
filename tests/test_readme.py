"""The README's commands: the two set-up commands, CI running exactly the test command, and every `ardiff`
command line in it resolving (training commands parse their config; data/sample/eval commands exist)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ardiff.cli import SUBCOMMANDS
from tests.test_cli import ardiff_inprocess as ardiff

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def command_lines() -> list[str]:
    lines = []
    for block in bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def ardiff_invocations() -> list[list[str]]:
    """The arguments after `ardiff` (or `-m ardiff.cli`) of every README command, in order."""
    calls = []
    for line in command_lines():
        tokens = shlex.split(line.replace("$HEAD", "localhost"))
        for i, tok in enumerate(tokens):
            if tok.endswith("ardiff") or tok == "ardiff.cli":
                args = tokens[i + 1 :]
                args = args[: args.index("&&")] if "&&" in args else args
                calls.append(args)
                break
    return calls


def test_setup_has_exactly_two_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(blocks) == 2
    demo, tests = (b.strip() for b in blocks)
    assert "ardiff fit -c experiments/transdiff/demo.yaml" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci/run").read_text()
    assert tests in ci.splitlines(), ".ci/run must run exactly the README's test command"


@pytest.mark.parametrize("args", ardiff_invocations(), ids=lambda a: " ".join(a)[:60])
def test_readme_ardiff_command_resolves(args):
    if args and args[0] in ("fit", "validate", "test", "predict"):
        if "--ckpt_path" in args:  # resuming needs a run; the parse is what is checked here
            i = args.index("--ckpt_path")
            args = args[:i] + args[i + 2 :]
        proc = ardiff(*args, "--print_config")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    words = next((w for w in SUBCOMMANDS if tuple(args[: len(w)]) == w), None)
    assert words is not None, f"README names an unknown ardiff command: {args}"
    proc = ardiff(*words, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every option the README passes exists in the subcommand's parser
    for opt in (a.split("=")[0] for a in args[len(words) :] if a.startswith("--")):
        assert opt in proc.stdout, f"{' '.join(words)} has no option {opt}"


def runnable_multiprocess_commands() -> list[list[str]]:
    """README training commands that start several processes on CPU (the FSDP2-on-CPU preset)."""
    return [a for a in ardiff_invocations() if a[:1] == ["fit"] and "experiments/strategies/fsdp2_cpu.yaml" in a]


@pytest.mark.slow
@pytest.mark.parametrize("args", runnable_multiprocess_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_multiprocess_command_runs(args, tmp_path, demo_root):
    """Run it for real (2 processes, a few steps, outputs in tmp): training, the end-of-run sample grid under
    FSDP2, and the checkpoint."""
    import subprocess
    import sys

    import yaml

    cfg = yaml.safe_load((ROOT / args[args.index("-c") + 1]).read_text())
    callbacks = cfg["trainer"]["callbacks"]
    for cb in callbacks:
        init = cb.get("init_args", {})
        if "dirpath" in init:
            init["dirpath"] = str(tmp_path / "ckpt")
        if "reference" in init:
            init["reference"] = str(tmp_path / "ref.npz")
    override = tmp_path / "outputs.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    i = args.index("--trainer.max_steps") if "--trainer.max_steps" in args else len(args)
    run = args[:i] + args[i + 2 :] + ["-c", str(override), "--trainer.max_steps", "3"]
    run += ["--data.init_args.root", str(demo_root), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    cli = [sys.executable, "-m", "ardiff.cli"]  # Lightning relaunches sys.argv for the second rank
    proc = subprocess.run([*cli, *run], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "ckpt" / "last.ckpt" / ".metadata").is_file()  # a distributed checkpoint of the 2 ranks

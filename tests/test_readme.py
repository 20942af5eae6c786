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

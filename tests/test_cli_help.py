"""``lightning-diff <command> --help`` prints the command's own Hydra help without importing torch or the command's
module (help answers in well under a second; benchmarks/ measures it), and the text is the one the command's
``hydra.main`` prints."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_diff.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_imports_no_torch(command):
    run = run_python("import sys\nfrom lightning_diff.cli import main\ntry:\n"
                     f"    main([{command!r}, '--help'])\nfinally:\n"  # Hydra's help ends in sys.exit(0)
                     "    print('imported:', sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"lightning-diff {command} "), run.stdout[:300]
    assert run.stdout.rstrip().endswith("imported: []"), run.stdout[-300:]


@pytest.mark.parametrize(("command", "overrides", "shown"), [
    ("sample", ["sampler=ddim", "num_samples=7"], "num_samples=7"),
    ("train", ["formulation=vp", "trainer.max_steps=9"], "callbacks/ema: "),  # $APP_CONFIG_GROUPS: Hydra lists them
])
def test_fast_help_is_the_commands_own_help(command, overrides, shown):
    """The text equals Hydra's own ``--help`` of the command's module (which composes once per config group)."""
    fast = subprocess.run([sys.executable, "-m", "lightning_diff", command, *overrides, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    own = subprocess.run([sys.executable, "-m", COMMANDS[command][0], *overrides, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert fast.returncode == own.returncode == 0, fast.stderr[-2000:] + own.stderr[-2000:]
    assert shown in fast.stdout and overrides[-1] in fast.stdout and fast.stdout == own.stdout


def test_a_bad_override_with_help_is_reported_by_hydra():
    run = subprocess.run([sys.executable, "-m", "lightning_diff", "leaderboard", "sampler=ddim", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Could not override 'sampler'" in run.stderr

"""``lightning-diff --help`` lists the commands with a line each; ``lightning-diff <command> --help`` shows the
command's main settings with their current values (its ``hydra.help`` template), not Hydra's generic text."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_diff", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_top_level_help_lists_each_command_on_one_line():
    run = cli("--help")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = {line.split()[0]: line for line in run.stdout.splitlines() if line.startswith("  ")}
    assert list(lines)[:3] == ["train", "sample", "evaluate"] and "leaderboard" in lines
    assert all(len(line.split()) > 2 for line in lines.values())  # a description beside each


def test_unknown_command_is_named_with_the_allowed_ones():
    run = cli("trian")
    assert run.returncode != 0 and "unknown command 'trian'; allowed: train, sample, evaluate" in run.stderr


@pytest.mark.parametrize("command,settings", [
    ("train", ["formulation=ncsn", "network=tiny_unet", "data.batch_size=128", "sampler=heun", "sampler.steps=",
               "trainer.max_steps=2000", "optimizer.lr="]),
    ("sample", ["ckpt=PATH", "num_samples=64", "sampler=default", "sampler.steps=", "sampler.batch_size=64",
                "guidance.scale=None", "euler_maruyama"]),
    ("evaluate", ["ckpt=PATH", "metrics.num_samples=50000", "metrics.batch_size=64", "sampler.steps=",
                  "sampler.batch_size=64", "bpd, fid, is, kid, pr, vlb"]),
    ("leaderboard", ["runs=[DIR|GLOB", "out=leaderboard", "metric=fid", "direction=auto", "~leaderboard"]),
])
def test_command_help_shows_its_main_settings(command, settings):
    run = cli(command, "formulation=ncsn", "--help") if command == "train" else cli(command, "--help")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"lightning-diff {command} ")
    assert all(s in run.stdout for s in settings), run.stdout
    assert "Powered by Hydra" not in run.stdout and "is powered by Hydra" not in run.stdout


def test_a_plus_typo_exits_with_the_key_and_a_did_you_mean(tmp_path):
    """The console path: Hydra's hint after ``formulaton=vp`` is ``+formulaton=vp``, which used to train EDM."""
    run = cli("train", "+formulaton=vp", f"hydra.run.dir={tmp_path / 'run'}")
    assert run.returncode != 0
    assert "+formulaton=vp: lightning-diff train has no setting 'formulaton'" in run.stderr, run.stderr[-2000:]
    assert "did you mean formulation?" in run.stderr

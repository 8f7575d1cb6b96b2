"""The package as a user installs it: a wheel built from this checkout carries its Hydra configs, and installed
(non-editable) into a fresh virtual environment outside the repository it runs ``lightning-diff --help`` and a
two-step ``lightning-diff train experiment=edm_digits`` from another directory.

The fresh environment takes the third-party dependencies from this interpreter's site-packages through a ``.pth``
line (a path line: the ``.pth`` files of that folder, such as this checkout's editable install, are not run), so
``lightning_diff`` itself can only come from the wheel; the test checks that it does."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # a copy of what the sdist holds, so that setuptools' build/ and egg-info land there, not in the checkout
    shutil.copytree(ROOT / "lightning_diff", source / "lightning_diff", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(source)], check=True, cwd=out, timeout=600)
    (path,) = out.glob("lightning_diff-*.whl")
    return path


def test_the_wheel_carries_every_config(wheel):
    configs = ROOT / "lightning_diff" / "configs"
    expected = {f"lightning_diff/configs/{p.relative_to(configs).as_posix()}" for p in configs.rglob("*.yaml")}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(expected) > 100 and expected <= names, sorted(expected - names)[:5]
    assert "lightning_diff/cli/main.py" in names and not any(n.startswith(("tests/", "experiments/")) for n in names)


def test_the_installed_wheel_trains_and_helps_from_another_directory(wheel, tmp_path):
    env_dir, work = tmp_path / "fresh", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True, timeout=600)

    env = {**os.environ, "WANDB_MODE": "offline", "LIGHTNING_DIFF_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import lightning_diff; print(lightning_diff.__file__)"], cwd=work,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not this checkout

    script = env_dir / "bin" / "lightning-diff"
    shown = subprocess.run([str(script), "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "train-classifier" in shown.stdout, shown.stderr
    run = subprocess.run([str(script), "train", "experiment=edm_digits", "trainer.max_steps=2", "logger=csv"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (last,) = work.glob("outputs/train/edm_digits/*/checkpoints/last.ckpt")
    assert last.stat().st_size > 0

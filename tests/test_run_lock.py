"""One run per folder: a training run holds ``<run folder>/.lock``; a second run in the same
``hydra.run.dir`` refuses, naming the folder and the holder's PID, before it writes anything there; the lock of a
killed run is taken over with a warning; only global rank 0 takes it.

Before the lock, two ``lightning-diff train ... hydra.run.dir=<same dir>`` both exited 0, the second one's
``.hydra/`` and checkpoints replacing the first one's.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir

from lightning_diff.checkpoint_io import load_checkpoint
from lightning_diff.config import CONFIG_DIR
from lightning_diff.training.run_lock import LOCK_NAME, RunFolderInUse, hold_run_folder, is_global_rank_zero

from .test_resume import TINY

ROOT = Path(__file__).resolve().parent.parent
RANKS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "WORLD_SIZE")

HOLD_CALLBACK = '''
import time
from pathlib import Path

import pytorch_lightning as pl


class Hold(pl.Callback):
    """Writes ``marker`` when training starts, then waits for ``release`` (at most 240 s); changes nothing else."""

    def __init__(self, marker, release):
        self.marker, self.release = Path(marker), Path(release)

    def on_train_start(self, trainer, pl_module):
        self.marker.touch()
        deadline = time.time() + 240
        while not self.release.exists() and time.time() < deadline:
            time.sleep(0.1)
'''

HOLDER = '''
import sys, time
from lightning_diff.config import CONFIG_DIR
from lightning_diff.training.run_lock import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
'''


def _env(tmp_path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    for key in RANKS:
        env.pop(key, None)
    return env


def _train_command(out, *extra) -> list[str]:
    return [sys.executable, "-m", "lightning_diff.cli.train", *TINY, "~logger", "trainer.max_steps=2",
            f"hydra.run.dir={out}", *extra]


@pytest.mark.slow  # two training processes: ~25 s of CPU, over a minute on a loaded 2-core machine
def test_a_second_run_in_the_same_folder_refuses_naming_it_and_the_pid(tmp_path):
    (tmp_path / "holder.py").write_text(HOLD_CALLBACK)
    out, marker, release = tmp_path / "run", tmp_path / "training", tmp_path / "release"
    first = subprocess.Popen(_train_command(out, "+callbacks.hold._target_=holder.Hold",
                                            f"+callbacks.hold.marker={marker}", f"+callbacks.hold.release={release}"),
                             cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert first.poll() is None and time.time() < deadline, "the first run ended or never started training"
            time.sleep(0.1)
        hydra_files = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}
        second = subprocess.run(_train_command(out, "seed=2"), cwd=ROOT, env=_env(tmp_path), capture_output=True,
                                text=True, timeout=300)
        release.touch()
        _, first_stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode != 0
    assert f"hydra.run.dir={out} is in use by PID {first.pid} on host " in second.stderr, second.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == hydra_files  # the first run's own
    assert first.returncode == 0, first_stderr[-3000:]
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["run_config"]["seed"] == 0  # the first run's


def test_a_held_folder_refuses_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(RunFolderInUse, match=rf"paths.output_dir={tmp_path} is in use by PID {holder.pid} on "):
            with hold_run_folder(tmp_path):
                pass
        # the command line's lock: the Hydra callback of configs/train.yaml, before Hydra writes into the folder
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", [f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
        callback = hydra.utils.instantiate(cfg.hydra.callbacks.run_folder_lock)
        with pytest.raises(SystemExit, match=rf"hydra.run.dir={tmp_path} is in use by PID {holder.pid} on "):
            callback.on_run_start(cfg)  # Hydra would only warn about an exception: the callback exits
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: the lock file still names it, the kernel released its lock
        holder.wait()
    with caplog.at_level("WARNING", logger="lightning_diff.training.run_lock"):
        with hold_run_folder(tmp_path):
            with hold_run_folder(tmp_path):  # re-entrant within a process (the Hydra callback, then train())
                pass
        assert f"taking over the stale lock of PID {holder.pid} on host " in caplog.text
        caplog.clear()
        with hold_run_folder(tmp_path):  # released cleanly: nothing stale to take over
            pass
        assert not caplog.text


def test_only_global_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    assert is_global_rank_zero({}) and is_global_rank_zero({"RANK": "0", "LOCAL_RANK": "0", "SLURM_PROCID": "0"})
    assert not is_global_rank_zero({"RANK": "8", "LOCAL_RANK": "0"})  # torchrun: node 1's first process
    assert not is_global_rank_zero({"LOCAL_RANK": "1", "NODE_RANK": "0"})  # Lightning's launcher: rank 1
    assert not is_global_rank_zero({"SLURM_PROCID": "3"})  # srun: task 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    with hold_run_folder(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK_NAME).exists()

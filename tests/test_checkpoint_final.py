"""``last.ckpt`` is the run's final state: after a run of any length, whatever
``every_n_train_steps``, and after a graceful stop by SIGINT (Ctrl-C) or SIGTERM (SLURM, before a requeue or at a
time limit). The oracle is the uninterrupted run: resuming from that ``last.ckpt`` ends bit for bit where a run
that was never stopped ends (weights, EMA, optimizer, schedule).

Before the fix a 12-step run saving every 5 steps left step 10 in ``last.ckpt`` (Lightning's
``ModelCheckpoint.on_train_end`` writes ``last`` only when nothing was saved during the run), and a signal left
no ``last.ckpt`` at all.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl

from lightning_diff.checkpoint_io import load_checkpoint
from lightning_diff.cli import train as train_module
from lightning_diff.training.builders import build_callbacks

from .test_resume import TINY, _assert_same_state, _run

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def _step(path) -> int:
    return load_checkpoint(path)["global_step"]


def test_last_ckpt_holds_the_final_step_and_resumes_exactly(tmp_path):
    first = _run(tmp_path / "run", 12, "~logger")  # checkpoints every 5 steps (TINY): the last at 10
    assert _step(first["checkpoint"]) == 12
    resumed = _run(tmp_path / "run", 17, "~logger", "ckpt=last")  # periodic save at 15, ends at 17
    assert _step(resumed["checkpoint"]) == 17
    reference = _run(tmp_path / "reference", 17, "~logger")
    _assert_same_state(reference["checkpoint"], resumed["checkpoint"])


def test_last_ckpt_holds_the_final_step_of_a_run_that_ends_with_its_epochs(tmp_path):
    # max_steps=-1: one epoch of 16 batches (1,000 points / 64); the periodic save is at step 15
    first = _run(tmp_path / "run", -1, "~logger", "trainer.max_epochs=1")
    assert _step(first["checkpoint"]) == 16
    resumed = _run(tmp_path / "run", -1, "~logger", "trainer.max_epochs=2", "ckpt=last")
    reference = _run(tmp_path / "reference", -1, "~logger", "trainer.max_epochs=2")
    assert _step(resumed["checkpoint"]) == 32
    _assert_same_state(reference["checkpoint"], resumed["checkpoint"])


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process at the end of training batch ``step`` (changes nothing else)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_training_saves_that_step_and_exits_with_its_status(tmp_path, monkeypatch, signum):
    """In-process: the signal arrives at the end of step 7 (periodic saves every 5); the run saves step 7, exits
    with 128 + signum before the fit-end work, and resuming from it ends where an uninterrupted run ends."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [*build_callbacks(cfg), SignalAt(signum, 7)])
    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path / "run", 12, "~logger")
    assert stopped.value.code == 128 + signum
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are back
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _step(last) == 7
    monkeypatch.undo()
    resumed = _run(tmp_path / "run", 12, "~logger", "ckpt=last")
    reference = _run(tmp_path / "reference", 12, "~logger")
    _assert_same_state(reference["checkpoint"], resumed["checkpoint"])


STEP_MARKER = '''
import time
from pathlib import Path

import pytorch_lightning as pl


class StepMarker(pl.Callback):
    """Writes the global step after each training batch to ``path`` and slows training down, so the test knows
    how far the run got before it sends a signal (changes nothing else)."""

    def __init__(self, path):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, *args):
        self.path.write_text(str(trainer.global_step))
        time.sleep(0.2)
'''


def _steps_done(marker: Path) -> int:
    text = marker.read_text() if marker.exists() else ""
    return int(text) if text else 0  # empty: read while being written


@pytest.mark.slow  # a training subprocess: 11-37 s each on the 2 shared cores (measured)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_training_process_with_a_resumable_last_ckpt(tmp_path, signum):
    """End to end: ``python -m lightning_diff.cli.train`` gets the signal after step 5 or later (no periodic save)."""
    (tmp_path / "marker.py").write_text(STEP_MARKER)
    out, steps = tmp_path / "run", tmp_path / "steps.txt"
    overrides = [*TINY, "logger=csv", f"hydra.run.dir={out}", "trainer.max_steps=200",
                 "callbacks.checkpoint.every_n_train_steps=1000",  # no periodic save: only the stop writes one
                 "+callbacks.marker._target_=marker.StepMarker", f"+callbacks.marker.path={steps}"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lightning_diff.cli.train", *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while _steps_done(steps) < 5:
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.time() < deadline, "the run did not reach step 5 within 240 s"
            time.sleep(0.1)
        signalled_at = _steps_done(steps)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, output[-3000:]  # the shell's convention: 130 / 143
    stopped_at = _step(out / "checkpoints" / "last.ckpt")
    assert signalled_at <= stopped_at < 200, (signalled_at, stopped_at)
    assert _steps_done(steps) == stopped_at  # no step after the one the checkpoint holds
    assert f"at global step {stopped_at}" in (out / "train.log").read_text()
    assert "sample_grid:" not in output and "checkpoint:" not in output  # the fit-end work is skipped
    every = "callbacks.checkpoint.every_n_train_steps=1000"  # as the stopped run
    resumed = _run(out, stopped_at + 4, "~logger", every, "ckpt=last")
    reference = _run(tmp_path / "reference", stopped_at + 4, "~logger", every)
    _assert_same_state(reference["checkpoint"], resumed["checkpoint"])


def test_periodic_checkpoints_are_named_by_their_step_alone(tmp_path):
    """The periodic checkpoints of the default callbacks are ``step<7 digits>.ckpt``: a name a Hydra override can
    take unquoted (before: Lightning inserted the metric name, ``stepstep=0000150.ckpt``, whose '=' Hydra reads as
    an override)."""
    import hydra

    from .helpers import compose_config

    cfg = compose_config("train", ["experiment=edm_digits"], tmp_path)
    callback = hydra.utils.instantiate(cfg.callbacks.checkpoint)
    assert Path(callback.format_checkpoint_name({"step": 150})).name == "step0000150.ckpt"

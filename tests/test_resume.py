"""Exact resume: N steps -> stop (or SIGKILL) -> ckpt=last -> N more equals 2N uninterrupted steps,
bit for bit on the CPU (weights, EMA, optimizer); the W&B run continues; checkpoints are atomic. The
comparison can fail: the same resume with the random states or the data-loader position dropped ends
elsewhere."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_diff.callbacks import checkpoint as run_state
from lightning_diff.checkpoint_io import AtomicCheckpointIO, ResumableDataLoader, load_checkpoint
from lightning_diff.cli.train import compose, finish_logging, train
from lightning_diff.data import Toy2DDataModule

ROOT = Path(__file__).resolve().parent.parent

# toy2d + a small MLP: 1,000 points / batch 64 = 16 batches an epoch, so N = 10 resumes mid-epoch and the
# second half crosses an epoch boundary; EMA, Adam and a cosine schedule all carry state.
TINY = ["data=toy2d", "data.num_samples=1000", "data.num_val_samples=64", "data.batch_size=64", "network=mlp",
        "network.hidden=32", "network.depth=1", "network.emb_channels=16", "lr_scheduler=cosine",
        "lr_scheduler.total_steps=40",
        "callbacks.sample_grid=null", "callbacks.progress=null", "callbacks.lr_monitor=null",
        "callbacks.checkpoint_best=null", "callbacks.checkpoint.every_n_train_steps=5",
        "trainer.check_val_every_n_epoch=1", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "run_name=resume"]


def _run(out_dir, steps, *extra):
    cfg = compose([*TINY, f"paths.output_dir={out_dir}", f"trainer.max_steps={steps}", *extra])
    try:
        return train(cfg)
    finally:
        finish_logging()


def _assert_same_state(a_path, b_path):
    a, b = (load_checkpoint(p) for p in (a_path, b_path))
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index in state_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[index][name], state_b[index][name]), (index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["nonfinite_steps"] == b["nonfinite_steps"]


def test_stop_resume_equals_uninterrupted(tmp_path, monkeypatch):
    reference = _run(tmp_path / "reference", 20, "~logger")
    first = _run(tmp_path / "resumed", 10, "logger=wandb")
    saved = load_checkpoint(first["checkpoint"])
    assert saved["global_step"] == 10 and saved["wandb_run_id"]
    (loader_state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["batches"] == 10  # the data-loader position, mid-epoch
    for broken in ("rng_dropped", "position_dropped"):  # the same first half, for the negative controls
        shutil.copytree(tmp_path / "resumed", tmp_path / broken)
    second = _run(tmp_path / "resumed", 20, "logger=wandb", "ckpt=last")
    # the same W&B run continues (wandb suffixes "-1" to the folder when one of that name exists)
    assert re.fullmatch(rf"offline-run-\d+_\d+-{saved['wandb_run_id']}(-\d+)?", Path(second["wandb_run"]).name)
    _assert_same_state(reference["checkpoint"], second["checkpoint"])
    # the comparison can fail: the same resume without restoring the random states, or the loader position
    with monkeypatch.context() as patch:
        patch.setattr(run_state, "set_rng_states", lambda states: None)
        rng_dropped = _run(tmp_path / "rng_dropped", 20, "~logger", "ckpt=last")
    with monkeypatch.context() as patch:
        patch.setattr(ResumableDataLoader, "load_state_dict", lambda self, state: None)
        position_dropped = _run(tmp_path / "position_dropped", 20, "~logger", "ckpt=last")
    for broken in (rng_dropped, position_dropped):
        assert load_checkpoint(broken["checkpoint"])["global_step"] == 20
        with pytest.raises(AssertionError):
            _assert_same_state(reference["checkpoint"], broken["checkpoint"])


SLEEP_CALLBACK = '''
import time
import pytorch_lightning as pl


class Sleep(pl.Callback):
    """Slows training down so the test can kill it mid-run (changes nothing else)."""

    def on_train_batch_end(self, *args):
        time.sleep(0.3)
'''


def test_killed_run_resumes_on_the_same_trajectory(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEP_CALLBACK)
    out = tmp_path / "killed"
    overrides = [*TINY, "~logger", f"hydra.run.dir={out}", "trainer.max_steps=30",
                 "+callbacks.sleep._target_=sleeper.Sleep"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lightning_diff.cli.train", *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            # checkpoints are written atomically, so a file that exists is complete
            if last.exists() and load_checkpoint(last)["global_step"] >= 10:
                break
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = load_checkpoint(last)["global_step"]
    assert 10 <= killed_at < 30, killed_at  # killed mid-run
    resumed = _run(out, 30, "~logger", f"ckpt={last}")
    reference = _run(tmp_path / "reference", 30, "~logger")
    _assert_same_state(reference["checkpoint"], resumed["checkpoint"])


def test_resumable_loader_continues_mid_epoch():
    datamodule = Toy2DDataModule(num_samples=100, num_val_samples=10, batch_size=16)
    loader = datamodule.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    loader.sampler.set_epoch(3)
    epoch = [x for x, _ in loader]
    loader.sampler.set_epoch(3)
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    state = loader.state_dict()
    assert state["batches"] == 4
    fresh = Toy2DDataModule(num_samples=100, num_val_samples=10, batch_size=16).train_dataloader()
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(3)
    rest = [x for x, _ in fresh]
    assert len(rest) == len(epoch) - 4
    for a, b in zip(rest, epoch[4:], strict=True):
        assert torch.equal(a, b)
    assert len([x for x, _ in fresh]) == len(epoch)  # the next epoch starts at its first batch
    fresh.load_state_dict({"batches": len(epoch), "generator": None})  # saved at an epoch's end
    assert len([x for x, _ in fresh]) == len(epoch)


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def torn_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind

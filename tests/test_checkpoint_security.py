"""Checkpoints load with ``weights_only=True``: a crafted ``.ckpt`` whose pickle would run code is
refused with an error naming the file and the refused global, by every loader of the package (``load_module``,
the W&B id lookup of a resume, and Lightning's own resume through ``AtomicCheckpointIO``); the checkpoints
``lightning_diff.cli.train`` writes need nothing beyond torch's own allowlist."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_diff import formulations
from lightning_diff.callbacks.checkpoint import saved_wandb_run_id
from lightning_diff.checkpoint_io import AtomicCheckpointIO, CheckpointError, load_checkpoint
from lightning_diff.cli.train import compose, finish_logging, train
from lightning_diff.data import Toy2DDataModule
from lightning_diff.networks import MLP
from lightning_diff.training.builders import load_module
from lightning_diff.training.module import DiffusionModule


class CreatesAFile:
    """Unpickling this object calls ``open(target, "w")``: the file appears if the loader runs the pickle."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


@pytest.fixture
def crafted(tmp_path, digits_ckpt):
    """A real checkpoint of ours with one extra entry whose unpickling creates ``tmp_path / "pwned"``."""
    checkpoint = load_checkpoint(digits_ckpt)
    target = tmp_path / "pwned"
    checkpoint["payload"] = CreatesAFile(target)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, target


def _resume_with_lightning(path):
    module = DiffusionModule(MLP(dim=2, hidden=8, depth=1, emb_channels=8), formulations.get("edm"),
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, Toy2DDataModule(num_samples=32, num_val_samples=8, batch_size=8), ckpt_path=path)


@pytest.mark.parametrize("loader", [load_checkpoint, load_module, saved_wandb_run_id,
                                    AtomicCheckpointIO().load_checkpoint, _resume_with_lightning],
                         ids=["load_checkpoint", "load_module", "saved_wandb_run_id", "AtomicCheckpointIO",
                              "trainer.fit(ckpt_path)"])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(crafted, loader):
    path, target = crafted
    with pytest.raises(CheckpointError, match=rf"{path}.*asks for io\.open.*refused"):
        loader(str(path))
    assert not target.exists()


def test_the_payload_would_run_under_an_unsafe_load(crafted):
    """The control: the same file loaded as before the fix (``weights_only=False``) creates the file."""
    path, target = crafted
    torch.load(path, weights_only=False)
    assert target.exists()


def test_our_checkpoints_hold_only_what_torch_allows_by_default(tmp_path, digits_ckpt):
    """A run with Adam(W), a cosine schedule, EMA, RunState and W&B (every kind of state a checkpoint of ours
    carries) writes nothing that ``weights_only`` would refuse, so no class is allowlisted."""
    cfg = compose(["data=toy2d", "data.num_samples=64", "data.batch_size=16", "network=mlp", "network.hidden=8",
                   "network.depth=1", "network.emb_channels=8", "optimizer=adamw", "lr_scheduler=cosine",
                   "callbacks/ema=inverse_decay", "callbacks.sample_grid=null", "callbacks.progress=null",
                   "callbacks.checkpoint_best=null", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                   "logger=wandb", f"paths.output_dir={tmp_path}"])
    try:
        written = train(cfg)["checkpoint"]
    finally:
        finish_logging()
    for path in (written, digits_ckpt):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        checkpoint = load_checkpoint(path)
        assert checkpoint["run_config"] and checkpoint["rng_states"] and "current_model_state" in checkpoint
    assert load_checkpoint(written)["wandb_run_id"] and load_checkpoint(written)["lr_schedulers"]

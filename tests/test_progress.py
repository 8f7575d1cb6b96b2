"""The training progress bar counts optimizer steps to max_steps (Lightning's own shows ``Epoch 153/-2``)."""

import io
import re

import pytest
import pytorch_lightning as pl
import rich
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lightning_diff.builders import build_datamodule, build_module
from lightning_diff.callbacks.progress import StepProgressBar
from lightning_diff.config import compose
from lightning_diff.train import train

# toy2d, 64 points in batches of 16: 4 batches an epoch, so 7 steps end inside the second epoch.
TINY = ["data=toy2d", "data.num_samples=64", "data.num_val_samples=16", "data.batch_size=16", "network=mlp",
        "network.hidden=16", "network.depth=1", "network.emb_channels=8", "~logger", "callbacks.lr_monitor=null",
        "callbacks.sample_grid=null", "callbacks.checkpoint_best=null", "trainer.check_val_every_n_epoch=1000"]


@pytest.fixture(autouse=True)
def _restore_rich_console():
    yield
    rich.reconfigure()  # the bar reconfigures rich's global console


def test_default_bar_shows_steps_against_max_steps(tmp_path, capsys):
    """What a run's log shows (stdout is not a terminal: rich prints the bar's last state)."""
    train(compose([*TINY, "trainer.max_steps=7", f"paths.output_dir={tmp_path}"]))
    out = capsys.readouterr().out
    assert not re.search(r"Epoch \d+/-\d", out), out  # Lightning's: "Epoch 1/-2 ━━━ 3/3"
    assert re.search(r"Epoch 1, step\W+7/7\b", out), out


def test_bar_counts_optimizer_steps_across_epochs(tmp_path):
    """With 2 batches per optimizer step, 5 steps are 10 batches over 3 epochs: the bar reads 5/5, drawn live."""
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}"])
    datamodule = build_datamodule(cfg)
    screen = io.StringIO()
    bar = StepProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 150})
    trainer = pl.Trainer(max_steps=5, max_epochs=-1, accumulate_grad_batches=2, logger=False, callbacks=[bar],
                         enable_checkpointing=False, check_val_every_n_epoch=1000, enable_model_summary=False)
    trainer.fit(build_module(cfg, datamodule), datamodule=datamodule)
    task = bar.train_progress_bar
    assert (task.total, task.completed) == (5, 5)
    assert "Epoch 2, step" in task.description
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert re.search(r"Epoch 2, step\W+5/5\b", drawn), drawn
    assert not re.search(r"/-\d", drawn), drawn


def test_run_resumed_mid_epoch_continues_the_count(tmp_path):
    """Resumed from step 3 (inside the first 4-batch epoch), the run's first hook is a batch end, with no epoch
    start before it: the bar appears there and counts on to 7/7."""
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}"])
    datamodule = build_datamodule(cfg)
    settings = dict(max_epochs=-1, logger=False, check_val_every_n_epoch=1000, enable_model_summary=False)
    every_3 = ModelCheckpoint(dirpath=tmp_path, filename="first", every_n_train_steps=3, save_top_k=-1)
    pl.Trainer(max_steps=5, enable_progress_bar=False, callbacks=[every_3], **settings).fit(
        build_module(cfg, datamodule), datamodule=datamodule)

    class Hooks(Callback):
        def __init__(self):
            self.seen = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.seen.append("epoch start")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(f"step {trainer.global_step}")

    bar, hooks = StepProgressBar(console_kwargs={"file": io.StringIO(), "force_terminal": True}), Hooks()
    pl.Trainer(max_steps=7, callbacks=[bar, hooks], enable_checkpointing=False, **settings).fit(
        build_module(cfg, datamodule), datamodule=datamodule, ckpt_path=tmp_path / "first.ckpt")
    assert hooks.seen[:2] == ["step 4", "epoch start"]
    task = bar.train_progress_bar
    assert (task.total, task.completed) == (7, 7)
    assert "Epoch 1, step" in task.description


def test_epoch_bounded_run_keeps_lightnings_bar(tmp_path):
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}"])
    datamodule = build_datamodule(cfg)
    bar = StepProgressBar(console_kwargs={"file": io.StringIO(), "force_terminal": True})
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[bar], enable_checkpointing=False,
                         limit_val_batches=0, enable_model_summary=False)
    trainer.fit(build_module(cfg, datamodule), datamodule=datamodule)
    task = bar.train_progress_bar
    assert (task.total, task.completed) == (4, 4)
    assert "Epoch 1/1" in task.description

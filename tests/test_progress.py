"""The training progress bar counts optimizer steps to max_steps (Lightning's own shows ``Epoch 153/-2``); the
sampling loops of ``sample`` and ``evaluate`` print plain progress lines where stdout is not a terminal."""

import io
import re

import pytest
import pytorch_lightning as pl
import rich
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from rich.console import Console

from lightning_diff.callbacks.progress import StepProgressBar
from lightning_diff.cli.train import train
from lightning_diff.config import compose
from lightning_diff.evaluation import generate
from lightning_diff.evaluation.progress import LineProgress
from lightning_diff.sampling.settings import SamplerSettings
from lightning_diff.training.builders import build_datamodule, build_module, load_module

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


# --- sampling loops: plain lines in a log --------------------------------------------------------------------

LINE = r"sampling \(heun, 2 steps\): (\d+)/10 images \(\d+%\), [\d.]+ images/s, elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d$"


def _run(screen, batches, seconds_per_batch, total, **console):
    """Advance a task of ``total`` images by ``batches`` (sizes) on a clock of ``seconds_per_batch`` per batch."""
    clock = [0.0]
    with LineProgress(console=Console(file=screen, **console), get_time=lambda: clock[0]) as bar:
        task = bar.add_task("sampling (heun, 18 steps)", total=total)
        for size in batches:
            clock[0] += seconds_per_batch
            bar.advance(task, size)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())


def test_log_gets_a_line_after_the_first_batch_then_per_tenth():
    """5 images a second: the first batch, then 10, 20... 100; at 50 of 100, 10 s in, 10 s are left."""
    lines = _run(io.StringIO(), [5] * 20, 1.0, 100).splitlines()
    assert [line.split()[4] for line in lines] == ["5/100", *(f"{k}/100" for k in range(10, 101, 10))]
    assert lines[0] == "sampling (heun, 18 steps): 5/100 images (5%), 5 images/s, elapsed 0:00:01, ETA 0:00:19"
    assert lines[5] == "sampling (heun, 18 steps): 50/100 images (50%), 5 images/s, elapsed 0:00:10, ETA 0:00:10"


def test_log_gets_a_line_at_least_every_30_seconds():
    """One image per 20 s of 1000: lines at 20 s (first batch), then 60, 100, 140, 180 s (30 s or more apart)."""
    lines = _run(io.StringIO(), [1] * 10, 20.0, 1000).splitlines()
    assert [line.split("elapsed ")[1].split(",")[0] for line in lines] == [
        "0:00:20", "0:01:00", "0:01:40", "0:02:20", "0:03:00"]


def test_terminal_states_a_long_estimate_once_after_the_first_batch():
    """The paper protocol on a CPU: 64 of 50,000 images in 20 s leave (50000 - 64) * 20 / 64 = 15605 s = 4:20:05,
    stated once above the bar; a 640-image task (9 s left) gets no line."""
    drawn = _run(io.StringIO(), [64] * 3, 20.0, 50_000, force_terminal=True, width=150)
    assert drawn.count("elapsed") == 1, drawn
    assert ("sampling (heun, 18 steps): 64/50000 images (0%), 3.2 images/s, elapsed 0:00:20, ETA 4:20:05"
            in drawn), drawn
    assert "elapsed" not in _run(io.StringIO(), [64] * 3, 1.0, 640, force_terminal=True, width=150)


def test_generate_prints_progress_lines_where_stdout_is_not_a_terminal(digits_ckpt, capsys):
    """Under nohup, a log file or SLURM (here: pytest's captured stdout), 10 images in batches of 2 print a line per
    batch (each a fifth). (Before: rich's transient bar printed nothing at all.)"""
    generate(load_module(digits_ckpt), range(10), sampler=SamplerSettings(name="heun", steps=2, batch_size=2))
    lines = capsys.readouterr().out.splitlines()
    assert [re.match(LINE, line)[1] for line in lines] == ["2", "4", "6", "8", "10"], lines

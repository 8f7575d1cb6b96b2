"""A progress bar that counts optimizer steps to ``trainer.max_steps``.

Lightning's bar counts the batches of the current epoch and labels it ``Epoch e/max_epochs-1``: for a run
bounded by steps (``max_epochs=-1``, as the configs here are) that reads ``Epoch 153/-2``, and its time
columns restart every epoch. ``StepProgressBar`` draws one training bar over the whole run,
``Epoch e, step k/max_steps``, so its remaining time is the run's. A run bounded by epochs only
(``max_steps=-1``) gets Lightning's bar unchanged.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

__all__ = ["StepProgressBar"]


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar shows ``trainer.global_step`` (optimizer steps: one per
    ``accumulate_grad_batches`` batches) out of ``trainer.max_steps``, across epochs and resumes."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps < 0:
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_enabled and self.progress is not None:
            self._show_step_bar(trainer)  # relabelled, never reset: elapsed and remaining time span the run
            self.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps < 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch: no on_train_epoch_start came first
            self._show_step_bar(trainer)
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def _show_step_bar(self, trainer: pl.Trainer) -> None:
        description = f"Epoch {trainer.current_epoch}, step"
        if self.theme.description:
            description = f"[{self.theme.description}]{description}"
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self.progress.add_task(description, total=trainer.max_steps,
                                                                completed=trainer.global_step)
        else:
            self.progress.update(self.train_progress_bar_id, description=description, visible=True)

"""``RunState``: the parts of a run that Lightning's checkpoint leaves out, so ``ckpt=last`` continues
the same trajectory and the same W&B run (docs/distributed.md#checkpoints-and-resume).

- Random streams per rank: at ``setup`` every rank seeds torch, numpy and ``random`` with
  ``seed * world_size + rank`` (NVlabs/edm ``training_loop.py``), so ranks draw different noise levels and
  noise for their different data, and a run is a function of (seed, world size).
- Checkpoints hold ``rng_states`` (one entry per rank: torch CPU and CUDA, numpy, python) and
  ``wandb_run_id``; on resume each rank gets its own states back just before the first training step.
The data-loader position is saved by Lightning through ``checkpoint_io.ResumableDataLoader``.

``LastCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the run's final state, at the
end of training and after a graceful stop by SIGINT or SIGTERM. ``resolve_ckpt_path`` turns ``ckpt=last`` /
``last_if_exists`` into the file to resume from.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from ..checkpoint_io import load_checkpoint

__all__ = ["RunState", "LastCheckpoint", "StopRequested", "STOP_SIGNALS", "rng_states", "set_rng_states",
           "resolve_ckpt_path", "saved_wandb_run_id"]

log = logging.getLogger(__name__)


def rng_states() -> dict:
    """This process's random states: torch (CPU, every CUDA device), numpy and python's ``random``, as
    tensors and tuples that ``checkpoint_io.load_checkpoint`` (``weights_only=True``) accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_states(states: dict) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunState(pl.Callback):
    """Seeds each rank, checkpoints every rank's random states and the W&B run id, restores them, and logs
    the file and global step a run resumed from.

    Args:
        seed: the run's seed (``${seed}``); rank r of W uses ``seed * W + r``.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._states_to_restore: dict | None = None
        self._resumed_from: tuple[str, int] | None = None  # (file, global step), logged once training starts

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # not pl.seed_everything: it would also set PL_GLOBAL_SEED, which seeds
            # Lightning's DistributedSampler shuffle, and shards must be shuffled alike on every rank
            seed = self.seed * trainer.world_size + trainer.global_rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            gathered = [None] * trainer.world_size  # every rank saves (Lightning dumps on all ranks)
            torch.distributed.all_gather_object(gathered, states)
            states = gathered
        else:
            states = [states]
        checkpoint["rng_states"] = states
        run_ids = [logger.version for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        checkpoint["wandb_run_id"] = run_ids[0] if run_ids else None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._resumed_from = (str(trainer.ckpt_path), checkpoint["global_step"])
        states = checkpoint.get("rng_states")
        if states is None:
            rank_zero_warn("RunState: the checkpoint holds no rng_states; the resumed run draws fresh noise")
        elif len(states) != trainer.world_size:
            rank_zero_warn(f"RunState: the checkpoint holds random states of {len(states)} ranks, this run "
                           f"has {trainer.world_size}; each rank keeps its fresh seed (another trajectory)")
        else:
            self._states_to_restore = states[trainer.global_rank]

    def on_train_start(self, trainer, pl_module) -> None:
        if self._resumed_from is not None and trainer.is_global_zero:
            log.info("Resumed from %s at global step %d", *self._resumed_from)
        self._resumed_from = None
        if self._states_to_restore is not None:
            set_rng_states(self._states_to_restore)
            self._states_to_restore = None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; SLURM's warning before a requeue or the time limit


class StopRequested(SystemExit):
    """Training stopped by a signal after saving ``last.ckpt``; the process exits with 128 + the signal number
    (130 for SIGINT, 143 for SIGTERM: the shell's convention for a job ended by a signal)."""


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the run's final state, so that ``ckpt=last`` continues where
    the run ended (docs/distributed.md#checkpoints-and-resume).

    - The final step is saved when it is reached (``trainer.max_steps``), before the fit-end work (sample grid,
      metrics), at the same point of the step as the periodic saves; a run ended otherwise (``max_epochs``) is saved
      when training ends. (Lightning's ``on_train_end`` writes ``last`` only when nothing was saved during the
      run, so a 600-step run saving every 500 steps left step 500 in it.)
    - A graceful stop: SIGINT (Ctrl-C) or SIGTERM during training lets the current optimizer step finish, saves
      ``last.ckpt`` at that step, and raises ``StopRequested`` (exit status 128 + the signal number), skipping
      the fit-end work so that the save fits in a scheduler's grace period. The handlers in place before (Python's
      ``KeyboardInterrupt``, Lightning's SIGTERM notice) are back from the first signal on, so a second Ctrl-C
      stops at once without saving; a signal that was ignored (``nohup``, a background job) stays ignored. Under DDP the
      ranks agree on the stop after each optimizer step (one all-reduce of a flag, as Lightning's own SIGTERM
      broadcast), and all of them save.

    Takes ``ModelCheckpoint``'s arguments, its signature unchanged (``configs/callbacks/default.yaml``:
    ``save_last: true``).
    """

    _last_saved_step: int | None = None  # the global step last.ckpt holds, once this callback wrote it
    _step_seen = 0  # global step at the previous training batch's end (it moves on optimizer steps)
    _stop_signal: int | None = None  # the signal received during this fit, if any
    _previous_handlers: tuple[tuple[int, object], ...] = ()  # (signal, handler) replaced while training runs

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen, self._stop_signal = trainer.global_step, None
        self._install_stop_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the periodic saves
        stepped, self._step_seen = trainer.global_step != self._step_seen, trainer.global_step
        if not stepped:  # inside a gradient accumulation: no optimizer step has ended here
            return
        stop = trainer.strategy.reduce_boolean_decision(self._stop_signal is not None, all=False)  # any rank
        final = 0 < trainer.max_steps <= trainer.global_step
        if stop or final:
            self._restore_handlers()
            self._save_last(trainer)
        if stop:
            signum = self._stop_signal or signal.SIGTERM  # a rank told by another one
            log.warning("%s: training stopped at global step %d, saved %s; resume with ckpt=last",
                        signal.Signals(signum).name, trainer.global_step, self.last_model_path)
            raise StopRequested(128 + signum)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        self._save_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def _save_last(self, trainer) -> None:
        """Write ``last.ckpt`` unless it already holds this global step."""
        if self.save_last and self._last_saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def _install_stop_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            return
        left = (signal.SIG_IGN, None)  # ignored (nohup, a background job) stays so; None: set outside Python
        self._previous_handlers = tuple((signum, signal.signal(signum, self._request_stop))
                                        for signum in STOP_SIGNALS if signal.getsignal(signum) not in left)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers:
            signal.signal(signum, handler)
        self._previous_handlers = ()

    def _request_stop(self, signum: int, frame) -> None:
        self._restore_handlers()  # a second signal acts at once
        self._stop_signal = signum
        log.warning("%s received: training stops after the current optimizer step and saves last.ckpt (a second "
                    "Ctrl-C stops at once, without saving)", signal.Signals(signum).name)


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | None) -> str | None:
    """The checkpoint file a run resumes from (None: start from scratch).

    ``ckpt_path`` is a file, or
    - ``last``: ``checkpoint_dir/last.ckpt``, which must exist. Every run writes to a new directory
      (``hydra.run.dir``, by default ``outputs/<task>/<experiment>/<time>_<id>``), so resuming means running
      in the old run's directory: ``hydra.run.dir=<that directory> ckpt=last``.
    - ``last_if_exists``: that file when it exists, else None with a log line: a job that may be a first
      start or a requeue (SLURM ``--requeue`` with a fixed ``hydra.run.dir``).
    Raises ``FileNotFoundError`` naming the file or folder looked in and how to point at a run."""
    if ckpt_path is None:
        return None
    if ckpt_path not in ("last", "last_if_exists"):
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt={ckpt_path}: no such file; allowed: a checkpoint file, last "
                                    "(<run dir>/checkpoints/last.ckpt) or last_if_exists")
        return ckpt_path
    if checkpoint_dir is None:
        raise ValueError(f"ckpt={ckpt_path} needs callbacks.checkpoint.dirpath (the folder of last.ckpt)")
    last = Path(checkpoint_dir) / "last.ckpt"
    if last.is_file():
        return str(last)
    if ckpt_path == "last_if_exists":
        log.info("ckpt=last_if_exists: no %s yet, starting from scratch", last)
        return None
    raise FileNotFoundError(
        f"ckpt=last: no last.ckpt in {checkpoint_dir}. Each run writes to a new directory, so point this "
        "one at the run to resume: hydra.run.dir=<that run's directory> ckpt=last, or pass the file: "
        "ckpt=<run dir>/checkpoints/last.ckpt. ckpt=last_if_exists starts from scratch when there "
        "is none (a requeued job).")


def saved_wandb_run_id(ckpt_path: str | None) -> str | None:
    """The W&B run id stored in a checkpoint written with ``RunState`` (read memory-mapped: no tensor
    data is loaded), or None."""
    if ckpt_path is None:
        return None
    return load_checkpoint(ckpt_path, mmap=True).get("wandb_run_id")

"""Training entry point: ``python -m lightning_diff.cli.train [overrides]`` (also ``lightning-diff train``).

Composes ``configs/train.yaml`` with Hydra, builds data, network, formulation, module, logger and
callbacks from their groups, trains, and writes a sample grid with the trained (EMA) weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..callbacks import EMA
from ..callbacks.checkpoint import resolve_ckpt_path, saved_wandb_run_id
from ..config import CONFIG_DIR, apply_smoke, check_global_batch, compose, smoke_alias
from ..evaluation.records import read_record
from ..known_warnings import silence_unactionable_warnings
from ..training.builders import build_callbacks, build_datamodule, build_logger, build_module
from ..training.resume_check import check_start
from ..training.run_lock import LOCK_NAME, RunFolderInUse, hold_run_folder, is_global_rank_zero
from .config_check import check_command, check_run_length
from .renamed import accepts_renamed_keys

__all__ = ["train", "compose", "finish_logging", "main"]

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Run one training job described by ``cfg``; returns the final metrics (floats) and output paths. Holds the
    lock of the run folder ``paths.output_dir`` meanwhile (``run_lock``: another run there refuses)."""
    with hold_run_folder(cfg.paths.output_dir):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict:
    check_run_length(cfg.trainer)
    check_global_batch(cfg)
    if smoke := apply_smoke(cfg):
        log.warning("smoke run (+smoke=true): network widths set to %s, random images, a few steps", smoke)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    checkpoint_dir = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath")
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt"), checkpoint_dir)  # ckpt=last / last_if_exists -> a file
    starts = check_start(cfg, ckpt_path, module)  # refuses another experiment's checkpoint; init_from= weights
    logger = build_logger(cfg, wandb_run_id=saved_wandb_run_id(ckpt_path))
    callbacks = build_callbacks(cfg) + starts  # InitFrom after EMA: it loads the EMA's average
    trainer = hydra.utils.instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    if logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    result = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result["output_dir"] = cfg.paths.output_dir
    result["weights"] = next((cb.evaluate_with for cb in callbacks if isinstance(cb, EMA)), "raw")
    for cb in callbacks:
        result.update(getattr(cb, "artifacts", {}))
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.last_model_path and Path(ckpt.last_model_path).exists():
        result["checkpoint"] = ckpt.last_model_path
    if logger and hasattr(logger, "experiment") and hasattr(logger.experiment, "dir"):
        result["wandb_run"] = str(Path(logger.experiment.dir).parent)
    return result


def record_failure(error: Exception) -> None:
    """Write ``error`` with its traceback into the job's log files (Hydra's ``<run dir>/train.log``; the terminal
    gets Hydra's own report), then remove the run folder if the run wrote nothing of value into it: nothing but
    what every start writes (Hydra's ``.hydra/``, the log file, ``run_lock``'s ``.lock``), as after a bad
    config. A folder with anything else in it (checkpoints, a logger's files, a user's files), or another run's
    (``RunFolderInUse``), is kept."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "the run failed: %s", (error,),
                            (type(error), error, error.__traceback__))
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for handler in files:
        handler.handle(record)
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    startup = {hydra_cfg.output_subdir, LOCK_NAME, *(Path(h.baseFilename).name for h in files)}
    if (is_global_rank_zero() and not isinstance(error, RunFolderInUse) and folder.is_dir()
            and {p.name for p in folder.iterdir()} <= startup):
        shutil.rmtree(folder)
        log.warning("removed the run folder %s: the run failed before writing anything into it", folder)


def finish_logging() -> None:
    """Close the W&B run (one run per Hydra multirun job)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


@accepts_renamed_keys("train")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    silence_unactionable_warnings()
    try:
        check_command(cfg, "train")  # every '+key' read, numbers and choices valid: before any work
        result = train(cfg)
    except Exception as error:  # not a graceful stop (StopRequested): that run keeps its folder
        record_failure(error)
        raise
    finally:
        finish_logging()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        for key in ("sample_grid", "checkpoint", "wandb_run"):
            if key in result:
                print(f"{key}: {result[key]}")
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    value = optimized_value(result, metric)
    log.info("optimized_metric %s: %.10g", metric, value)
    return value


def optimized_value(result: dict, metric: str) -> float:
    """The number a Hydra sweeper (Optuna) optimises, from the ``result`` of :func:`train`.

    A metric of the evaluation records (``fid``, ``kid_mean``, ``is_mean``, ``bpd``... : no ``/`` in the name) is
    read back from the newest record file this run's metric callbacks wrote (``result["record/<callback>"]``), so
    the sweep optimises the very number the leaderboard ranks, with its protocol; a logged scalar (``val/loss``,
    ``train/loss``) comes from the trainer's logged metrics.
    """
    if "/" not in metric:
        records = [read_record(path) for key, path in result.items() if key.startswith("record/")]
        values = [r["metrics"][metric] for r in records if metric in r["metrics"]]
        if values:
            return float(values[-1])
        raise ValueError(f"optimized_metric={metric!r}: no evaluation record of this run holds it (records: "
                         f"{[k for k in result if k.startswith('record/')] or 'none'}); allowed: a metric of "
                         "callbacks=[default,generative_metrics] or [default,bits_per_dim] records (fid, kid_mean, "
                         f"bpd, ...) or a logged scalar: {sorted(k for k in result if '/' in k)}")
    if metric not in result:
        raise ValueError(f"optimized_metric={metric!r} was not logged by this run; allowed: {sorted(result)}")
    return result[metric]


if __name__ == "__main__":
    sys.argv[1:] = smoke_alias(sys.argv[1:])  # +smoke=true
    main()

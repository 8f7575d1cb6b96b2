"""``GenerativeMetrics`` (FID/IS/KID/PR) and ``BitsPerDim``: evaluation during and at the end of training.

Both run every ``every_n_epochs`` validation epochs (on the EMA weights, which Lightning's
``WeightAveraging`` swaps in for validation) and when training ends (after an ``EMA`` callback listed
before them copied the average into the module). Every rank runs them: each generates its shard of the
seeds or scores its shard of the images, and the statistics are all-reduced inside the evaluation library
``lightning_diff.evaluation`` (no collective sits in rank-zero-only code). Values are logged as
``metrics/<name>``; the protocol goes into the W&B run summary (``metrics/<callback>/protocol``), and each
evaluation is a record (``lightning_diff.evaluation.records``, the shape ``lightning-diff evaluate`` writes):
``eval-train-<callback>-step<N>.json`` in the checkpoint folder, in the W&B summary (``records/<callback>``) and
as a W&B Table.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from ..aliases import renamed_keywords
from ..evaluation import SAMPLE_METRICS, sample_quality, split_bits_per_dim
from ..evaluation.records import log_record_to_wandb, make_record, rerun_command, run_description, write_record
from ..sampling.settings import SamplerSettings
from .ema import EMA

__all__ = ["GenerativeMetrics", "BitsPerDim"]


class _PeriodicEvaluation(pl.Callback):
    """Runs ``measure(trainer, module) -> (values, protocol)`` every n-th validation epoch and at fit end.

    Attributes ``history``: one ``{"epoch", "step", "weights", "values", "protocol"}`` per evaluation;
    ``artifacts``: ``{"record/<key>": path}`` of the newest record written (``lightning_diff.cli.train`` returns it)."""

    key = "evaluation"  # W&B summary key of the protocol
    section = "samples"  # the protocol's section in the record (as lightning-diff evaluate writes it)

    def __init__(self, every_n_epochs: int = 0, at_fit_end: bool = True):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"{self.key}.every_n_epochs={every_n_epochs!r} is invalid; allowed: an integer >= 0 "
                             "(0 = only when training ends)")
        self.every_n_epochs, self.at_fit_end = every_n_epochs, at_fit_end
        self.history: list[dict] = []
        self.artifacts: dict[str, str] = {}

    def measure(self, trainer, module, weights: str) -> tuple[dict, dict]:
        raise NotImplementedError

    def _weights(self, trainer, at_fit_end: bool) -> str:
        """``"ema"`` when an EMA callback evaluating with the average has put it in the module: always during
        validation, and at fit end when that callback comes before this one (it copies the average then)."""
        callbacks = list(trainer.callbacks)
        emas = [i for i, cb in enumerate(callbacks) if isinstance(cb, EMA) and cb.evaluate_with == "ema"]
        if not emas or (at_fit_end and emas[0] > callbacks.index(self)):
            return "raw"
        return "ema"

    def _evaluate(self, trainer, module, at_fit_end: bool) -> dict:
        weights = self._weights(trainer, at_fit_end)
        started = time.perf_counter()
        values, protocol = self.measure(trainer, module, weights)
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "weights": weights,
                  "values": values, "protocol": protocol}
        self.history.append(record)
        if trainer.is_global_zero:  # no collective below: summaries and files only
            self._write_record(trainer, module, values, {"weights": weights, self.section: protocol},
                               time.perf_counter() - started)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update({f"metrics/{self.key}/protocol": protocol,
                                                      **{f"metrics/{k}": v for k, v in values.items()}})
        return values

    def _write_record(self, trainer, module, values: dict, protocol: dict, wall_time_s: float) -> None:
        """The evaluation as a record beside the checkpoints (the trainer's root folder without a checkpoint
        callback) and in every W&B logger's run."""
        checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
        folder = Path(checkpoints or trainer.default_root_dir)
        config = {"callback": self.key, **getattr(self, "settings", {}), "metrics": getattr(self, "metrics", [])}
        run = {**run_description(None, getattr(module, "run_config", None), trainer.global_step),
               "dir": str((folder.parent if folder.name == "checkpoints" else folder).resolve())}
        record = make_record(values, protocol, config, kind="training", run=run, command=rerun_command("train"),
                             wall_time_s=wall_time_s, cache_dir=config.get("cache_dir"))
        folder.mkdir(parents=True, exist_ok=True)
        record = write_record(folder, record, name=f"train-{self.key}-step{trainer.global_step}")
        self.artifacts[f"record/{self.key}"] = record["path"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_record_to_wandb(logger.experiment, record, self.key)

    def on_validation_epoch_end(self, trainer, module):
        epoch = trainer.current_epoch
        if self.every_n_epochs > 0 and not trainer.sanity_checking and (epoch + 1) % self.every_n_epochs == 0:
            for name, value in self._evaluate(trainer, module, at_fit_end=False).items():
                module.log(f"metrics/{name}", value)  # the same value on every rank: no sync needed

    def on_train_end(self, trainer, module):
        if self.at_fit_end:
            values = self._evaluate(trainer, module, at_fit_end=True)
            for logger in trainer.loggers:  # self.log is not allowed here; loggers write on rank zero only
                logger.log_metrics({f"metrics/{k}": v for k, v in values.items()}, step=trainer.global_step)


class GenerativeMetrics(_PeriodicEvaluation):
    """FID, IS, KID and precision/recall of the module's samples against a split of the training data.

    Args:
        metrics: any of ``fid``, ``is``, ``kid``, ``pr`` (logged as ``metrics/fid``, ``metrics/is_mean``...).
        every_n_epochs: evaluate at the end of every n-th validation epoch (0 = only at fit end).
        at_fit_end: evaluate when training ends.
        num_samples, seed, seed_sets: generated images per seed set (old keyword: ``num_images``), first seed, seed
            sets (EDM: min of 3).
        sampler: a ``SamplerSettings`` or its config node (``configs/callbacks/generative_metrics.yaml``
            interpolates the run's ``sampler``); None: the module's own. Checked against the formulation
            when fitting starts, before any training step.
        guidance: classifier-free guidance gamma (1 = none).
        reference, reference_num_images: reference split (statistics cached) and an optional image limit.
        inception_weights, batch_size, cache_dir, options, feature_extractor: as ``configs/evaluate.yaml``'s
            ``metrics`` node
            (``batch_size``: images per feature-extractor call; ``options``: per-metric settings such as
            ``{"fid": {"method": "eigvals"}}``).
    """

    key = "generative_metrics"

    @renamed_keywords(num_images="num_samples")
    def __init__(self, metrics: Sequence[str] = ("fid",), every_n_epochs: int = 0, at_fit_end: bool = True,
                 num_samples: int = 10_000, seed: int = 0, seed_sets: int = 1,
                 sampler: SamplerSettings | Mapping | None = None, guidance: float = 1.0, reference: str = "train",
                 reference_num_images: int | None = None, inception_weights="auto", batch_size: int = 64,
                 cache_dir: str | None = None, options: dict | None = None, feature_extractor: str | None = None):
        super().__init__(every_n_epochs, at_fit_end)
        self.sampler = None if sampler is None else SamplerSettings.from_config(sampler)
        self.metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        bad = [m for m in self.metrics if m not in SAMPLE_METRICS]
        if bad or not self.metrics:
            raise ValueError(f"generative_metrics.metrics={self.metrics!r}: unknown {bad}; allowed: any of "
                             f"{list(SAMPLE_METRICS)} (bits/dim: the BitsPerDim callback)")
        self.settings = dict(num_samples=num_samples, seed=seed, seed_sets=seed_sets, guidance=guidance,
                             reference=reference, reference_num_images=reference_num_images,
                             inception_weights=inception_weights, batch_size=batch_size, cache_dir=cache_dir,
                             options=dict(options or {}), feature_extractor=feature_extractor)

    def setup(self, trainer, module, stage: str) -> None:
        """Check the sampler against the module's formulation before any training step."""
        if self.sampler is not None:
            self.sampler.check(module.formulation)

    def measure(self, trainer, module, weights: str) -> tuple[dict, dict]:
        return sample_quality(module, trainer.datamodule, self.metrics, weights=weights, sampler=self.sampler,
                              **self.settings)


class BitsPerDim(_PeriodicEvaluation):
    """Probability-flow ODE bits/dim on the test split (val when the data has none), logged as
    ``metrics/bpd``; each rank scores its shard of the batches with the unwrapped module, sums all-reduced.

    Args:
        every_n_epochs, at_fit_end: when (as ``GenerativeMetrics``).
        split, num_images, passes, batch_size, seed, rtol, atol, divergence, probes, probe, sigma_min,
            sigma_max: as ``configs/metrics/bpd.yaml`` and ``evaluation.split_bits_per_dim``.
    """

    key = "bits_per_dim"
    section = "bpd"

    def __init__(self, every_n_epochs: int = 0, at_fit_end: bool = True, split: str = "test",
                 num_images: int | None = None, passes: int = 1, batch_size: int = 64, seed: int = 0,
                 rtol: float = 1e-5, atol: float = 1e-5, divergence: str = "hutchinson", probes: int = 1,
                 probe: str = "rademacher", sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__(every_n_epochs, at_fit_end)
        self.settings = dict(split=split, num_images=num_images, passes=passes, batch_size=batch_size, seed=seed,
                             rtol=rtol, atol=atol, divergence=divergence, probes=probes, probe=probe,
                             sigma_min=sigma_min, sigma_max=sigma_max)

    def measure(self, trainer, module, weights: str) -> tuple[dict, dict]:
        values, protocol = split_bits_per_dim(module, trainer.datamodule, **self.settings)
        return values, {**protocol, "weights": weights}

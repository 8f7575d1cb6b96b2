"""Where a training run starts: a resume (``ckpt=``) continues only the experiment its checkpoint was trained
for; ``init_from=`` starts a new one from a checkpoint's weights (docs/distributed.md#checkpoints-and-resume).

- ``check_start`` runs before the trainer is built. It refuses ``ckpt=`` when the checkpoint's stored run
  config differs from this run's in what defines the experiment (``formulation``, ``network``, ``objective``,
  ``module.conditional``, the data module, the data's shape and classes), naming both values, and returns the
  ``InitFrom`` callback of ``init_from=`` on a fresh start.
- ``InitFrom`` loads the weights (raw and, when the checkpoint has one, the EMA average) into the module at the fit's
  ``setup``, before any step; the optimizer, schedules, EMA decay schedule and step count start afresh, and the new
  run's config is what its checkpoints store. A network of another shape is refused naming the parameter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import WeightAveraging

from ..aliases import current_keywords
from ..checkpoint_io import load_checkpoint
from .module import DiffusionModule

__all__ = ["InitFrom", "check_start"]

log = logging.getLogger(__name__)

_GROUPS = ("formulation", "network", "objective")  # config groups a resume must keep, every setting of them
_MISSING = "<unset>"  # how a setting absent on one side is shown


def check_start(cfg: DictConfig, ckpt_path: str | None, module: DiffusionModule) -> list[pl.Callback]:
    """Check where this run starts; returns ``[InitFrom(...)]`` for ``init_from=`` on a fresh start, else ``[]``.

    ``ckpt_path`` is the resolved file to resume from (``callbacks.checkpoint.resolve_ckpt_path``) and ``module``
    this run's module. Raises ValueError when the checkpoint was trained for another experiment, or when
    ``init_from`` comes with a ``ckpt=`` other than ``last_if_exists`` (a requeued fine-tuning job: it resumes
    its own ``last.ckpt`` once there is one)."""
    init_from, asked = cfg.get("init_from"), cfg.get("ckpt")
    if init_from is not None and asked not in (None, "last_if_exists"):
        raise ValueError(f"init_from={init_from} and ckpt={asked}: pick one. ckpt resumes the same "
                         "experiment (weights, optimizer, step); init_from starts a new run from a checkpoint's "
                         "weights. Both together are allowed with ckpt=last_if_exists only (a requeued job)")
    if ckpt_path is not None:
        _check_same_experiment(ckpt_path, module)
        if init_from is not None:
            log.info("init_from=%s not used: this run resumes its own %s", init_from, ckpt_path)
        return []
    return [] if init_from is None else [InitFrom(init_from, module)]


def _experiment_settings(run_config: dict, data_shape, num_classes: int) -> dict:
    """What defines an experiment, flat: ``{"formulation._target_": ..., "formulation.beta_d": ..., "network...",
    "objective...", "module.conditional", "data._target_", "data shape", "data classes"}``."""
    settings = {}
    for group in _GROUPS:  # a checkpoint's settings under the names of today (formulation.M: num_timesteps)
        settings |= _flatten(current_keywords(run_config.get(group)), group)
    settings["module.conditional"] = (run_config.get("module") or {}).get("conditional")
    settings["data._target_"] = (run_config.get("data") or {}).get("_target_")
    settings["data shape"] = None if data_shape is None else list(data_shape)
    settings["data classes"] = num_classes
    return settings


def _flatten(node, prefix: str) -> dict:
    if isinstance(node, dict):
        return {key: value for name, child in node.items()
                for key, value in _flatten(child, f"{prefix}.{name}").items()}
    return {prefix: node}


def _check_same_experiment(ckpt_path: str, module: DiffusionModule) -> None:
    checkpoint = load_checkpoint(ckpt_path, mmap=True)  # the config only: no tensor data is read
    if checkpoint.get("run_config") is None:
        raise ValueError(f"ckpt={ckpt_path} holds no run_config: it was not written by lightning_diff.cli.train")
    trained = _experiment_settings(checkpoint["run_config"], checkpoint.get("data_shape"),
                                   checkpoint.get("num_classes"))
    asked = _experiment_settings(module.run_config, module.data_shape, module.num_classes)
    changed = _changed(trained, asked)
    if changed:
        raise ValueError(
            f"ckpt={ckpt_path} was trained with {_show(changed, trained)}, this run asks for "
            f"{_show(changed, asked)}; a resume continues the same experiment (change only settings such as "
            f"trainer.max_steps). To fine-tune from its weights with a fresh optimizer at step 0, use "
            f"init_from={ckpt_path} instead of ckpt")


def _changed(trained: dict, asked: dict) -> list[str]:
    """The settings that differ; where a class (``_target_``) differs, that setting alone for its node."""
    changed = [key for key in dict.fromkeys([*trained, *asked])
               if trained.get(key, _MISSING) != asked.get(key, _MISSING)]
    swapped = [key.removesuffix("._target_") + "." for key in changed if key.endswith("._target_")]
    return [key for key in changed
            if key.endswith("._target_") or not any(key.startswith(node) for node in swapped)]


def _show(keys: list[str], settings: dict) -> str:
    """``formulation=VP`` for a class, ``network.hidden=32`` for a setting."""
    shown = []
    for key in keys:
        value = settings.get(key, _MISSING)
        if key.endswith("._target_") and isinstance(value, str):
            key, value = key.removesuffix("._target_"), value.rsplit(".", 1)[-1]
        shown.append(f"{key}={value}")
    return ", ".join(shown)


class InitFrom(pl.Callback):
    """Starts training from the weights of checkpoint ``path`` (``init_from=``): the raw weights into the module
    and, when the checkpoint has an EMA average, that average into the run's ``WeightAveraging`` callbacks (EMA),
    at the fit's ``setup``. Put it after the EMA callback. Raises ValueError at construction, naming the
    parameter, when ``module`` (this run's) does not have the checkpoint's parameter names and shapes."""

    def __init__(self, path: str, module: DiffusionModule):
        if not Path(path).is_file():
            raise FileNotFoundError(f"init_from={path}: no such file; allowed: a checkpoint written by lightning-diff "
                                    "train (<run dir>/checkpoints/last.ckpt)")
        checkpoint = load_checkpoint(path)
        self.path, self.step = path, checkpoint["global_step"]
        self._raw = checkpoint.get("current_model_state", checkpoint["state_dict"])  # EMA runs keep raw apart
        _check_shapes(path, self._raw, module.state_dict())
        has_average = "current_model_state" in checkpoint and "averaging_state" in checkpoint
        self._average = {key: checkpoint[key] for key in ("state_dict", "current_model_state", "averaging_state")
                         } if has_average else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._raw is None:
            return
        pl_module.load_state_dict(self._raw)
        averages = [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)]
        for callback in averages if self._average is not None else ():
            callback.on_load_checkpoint(trainer, pl_module, self._average)  # Lightning's own loading of an average
        loaded = "raw and EMA" if self._average is not None and averages else "raw"
        log.info("init_from=%s: %s weights of its step %d loaded; fresh optimizer, step 0", self.path, loaded,
                 self.step)
        self._raw = self._average = None


def _check_shapes(path: str, saved: dict, own: dict) -> None:
    for name in dict.fromkeys([*saved, *own]):
        if name not in own or name not in saved:
            where = "the checkpoint" if name in saved else "this run's network"
            raise ValueError(f"init_from={path}: parameter {name} is only in {where}; allowed: a checkpoint "
                             "of this run's network (the same parameter names and shapes)")
        if saved[name].shape != own[name].shape:
            raise ValueError(f"init_from={path}: parameter {name} has shape {list(saved[name].shape)} in the "
                             f"checkpoint and {list(own[name].shape)} in this run's network; allowed: a checkpoint "
                             "of this run's network (the same parameter names and shapes)")

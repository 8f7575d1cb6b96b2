"""Build the objects of a run from a composed Hydra config (shared by train, sample and evaluate)."""

from __future__ import annotations

import functools
import inspect
import os

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint_io import resumable
from .module import DiffusionModule

__all__ = ["register_resolvers", "build_datamodule", "build_network", "build_module", "build_logger",
           "build_callbacks", "load_module", "wandb_offline"]

# Network settings that may be left null in a network config and are then read off the data module.
_FROM_DATA = {
    "in_channels": lambda dm: dm.data_shape[0],
    "img_channels": lambda dm: dm.data_shape[0],
    "resolution": lambda dm: dm.data_shape[-1],
    "img_resolution": lambda dm: dm.data_shape[-1],
    "input_size": lambda dm: dm.data_shape[-1],
    "dim": lambda dm: dm.data_shape[0],
    "num_classes": lambda dm: dm.num_classes,
    "label_dim": lambda dm: dm.num_classes,
}


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is configured or ``WANDB_MODE=online`` is asked for."""
    if os.environ.get("WANDB_MODE") == "online":
        return False
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return True
    return not os.environ.get("WANDB_API_KEY")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


def _resumable_train_loader(make_loader):
    return resumable(make_loader())


def build_datamodule(cfg: DictConfig):
    """``cfg.data``, its training loader made resumable (``checkpoint_io.ResumableDataLoader``: the position
    in the epoch goes into checkpoints)."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.train_dataloader = functools.partial(_resumable_train_loader, datamodule.train_dataloader)
    return datamodule


def build_network(cfg: DictConfig, data_shape, num_classes: int, conditional: bool):
    """Instantiate ``cfg.network``; settings left null (channels, resolution, classes) come from the data.

    A conditional run needs a network with classes; explicit settings that contradict the data raise."""

    class _Data:  # the two facts a network needs from the data
        pass

    data = _Data()
    data.data_shape, data.num_classes = tuple(data_shape), (num_classes if conditional else 0)
    target = hydra.utils.get_class(cfg.network._target_)
    accepted = inspect.signature(target).parameters
    fill = {k: fn(data) for k, fn in _FROM_DATA.items() if k in accepted and cfg.network.get(k, None) is None}
    for key in ("in_channels", "img_channels", "dim"):
        value = cfg.network.get(key, None)
        if value is not None and value != data.data_shape[0]:
            raise ValueError(f"network.{key}={value} does not match the data ({data.data_shape}); "
                             f"set network.{key}=null to take it from the data")
    return hydra.utils.instantiate(cfg.network, **fill)


def build_module(cfg: DictConfig, datamodule) -> DiffusionModule:
    conditional = bool(cfg.module.get("conditional", False))
    if conditional and not datamodule.num_classes:
        raise ValueError(f"module.conditional=true but data={datamodule.name} has no class labels")
    network = build_network(cfg, datamodule.data_shape, datamodule.num_classes, conditional)
    formulation = hydra.utils.instantiate(cfg.formulation)
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    lr_scheduler = hydra.utils.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    module = hydra.utils.instantiate(cfg.module, network=network, formulation=formulation, optimizer=optimizer,
                                     lr_scheduler=lr_scheduler)
    module.data_shape, module.num_classes = tuple(datamodule.data_shape), datamodule.num_classes
    module.data_transform = getattr(datamodule, "transform", None)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return module


def build_logger(cfg: DictConfig, wandb_run_id: str | None = None):
    """``cfg.logger``; a W&B logger continues run ``wandb_run_id`` when given (a resumed training).
    ``~logger`` (no logger group) means no logger at all (False, so that Lightning does not add its default one)."""
    if not cfg.get("logger"):
        return False
    if wandb_run_id is not None and cfg.logger._target_.endswith("WandbLogger"):
        return hydra.utils.instantiate(cfg.logger, id=wandb_run_id, resume="allow")
    return hydra.utils.instantiate(cfg.logger)


def build_callbacks(cfg: DictConfig) -> list:
    return [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def load_module(ckpt_path: str, weights: str = "ema", map_location="cpu") -> DiffusionModule:
    """Rebuild a ``DiffusionModule`` from a checkpoint written by ``train`` (the run's config is stored in it).

    The checkpoint's ``state_dict`` holds the EMA weights when training used EMA (Lightning's
    ``WeightAveraging`` stores the average there and the raw weights under ``current_model_state``).
    ``weights="ema"`` loads the average when there is one, ``"raw"`` the trained weights; the choice made
    is in ``module.weights``."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r} is not known; allowed: ema, raw")
    checkpoint = torch.load(ckpt_path, map_location=map_location, weights_only=False)
    cfg = checkpoint.get("run_config")
    if cfg is None:
        raise ValueError(f"{ckpt_path} holds no run_config: it was not written by lightning_diff.train")
    cfg = OmegaConf.create(cfg)
    shape = checkpoint["data_shape"]
    network = build_network(cfg, shape, checkpoint.get("num_classes", 0), cfg.module.get("conditional", False))
    module = hydra.utils.instantiate(cfg.module, network=network, formulation=hydra.utils.instantiate(cfg.formulation))
    has_ema = "current_model_state" in checkpoint
    module.load_state_dict(checkpoint["current_model_state" if weights == "raw" and has_ema else "state_dict"])
    module.on_load_checkpoint(checkpoint)
    module.weights = "ema" if has_ema and weights == "ema" else "raw"
    return module.eval()

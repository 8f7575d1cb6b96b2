"""Build the objects of a run from a composed Hydra config (shared by train, sample and evaluate).

Builders construct objects and pass them what they need; they set no attribute on, and patch no method of,
what they build."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint_io import load_checkpoint
from ..data.augment import check_augment_dim
from ..data.transforms import DataTransform
from ..pretrained import load_pretrained, remote
from .module import DiffusionModule

__all__ = ["build_datamodule", "build_network", "build_module", "build_logger", "build_callbacks", "load_module",
           "is_released", "pretrained_flags", "resolve_device"]

_RELEASED_SUFFIXES = (".pkl", ".pt", ".pth")  # files of the papers' own code (lightning_diff.pretrained)

# Network settings that may be left null in a network config and are then read off the data:
# setting -> f(data_shape, num_classes).
_FROM_DATA = {
    "in_channels": lambda shape, classes: shape[0],
    "img_channels": lambda shape, classes: shape[0],
    "resolution": lambda shape, classes: shape[-1],
    "img_resolution": lambda shape, classes: shape[-1],
    "input_size": lambda shape, classes: shape[-1],
    "dim": lambda shape, classes: shape[0],
    "num_classes": lambda shape, classes: classes,
    "label_dim": lambda shape, classes: classes,
}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:i]``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_datamodule(cfg: DictConfig):
    """``cfg.data`` (its training loader is resumable by itself: ``data.loading.make_loader``)."""
    return hydra.utils.instantiate(cfg.data)


def build_network(cfg: DictConfig, data_shape, num_classes: int, conditional: bool):
    """Instantiate ``cfg.network``; settings left null (channels, resolution, classes) come from the data.

    A conditional run needs a network with classes; explicit settings that contradict the data raise."""
    shape, classes = tuple(data_shape), (num_classes if conditional else 0)
    target = hydra.utils.get_class(cfg.network._target_)
    accepted = inspect.signature(target).parameters
    fill = {k: fn(shape, classes) for k, fn in _FROM_DATA.items()
            if k in accepted and cfg.network.get(k, None) is None}
    for key in ("in_channels", "img_channels", "dim"):
        value = cfg.network.get(key, None)
        if value is not None and value != shape[0]:
            raise ValueError(f"network.{key}={value} does not match the data ({shape}); "
                             f"set network.{key}=null to take it from the data")
    return hydra.utils.instantiate(cfg.network, **fill)


def build_module(cfg: DictConfig, datamodule) -> DiffusionModule:
    """``cfg.module`` with its network, formulation, optimizer, schedule and augmentation built from their groups,
    told the data's shape, classes and transform and the resolved run config (stored in checkpoints)."""
    conditional = bool(cfg.module.get("conditional", False))
    if conditional and not datamodule.num_classes:
        raise ValueError(f"module.conditional=true but data={datamodule.name} has no class labels")
    network = build_network(cfg, datamodule.data_shape, datamodule.num_classes, conditional)
    formulation = hydra.utils.instantiate(cfg.formulation)
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    lr_scheduler = hydra.utils.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    augment_pipe = hydra.utils.instantiate(cfg.augment) if cfg.get("augment") else None
    check_augment_dim(getattr(network, "augment_dim", 0), augment_pipe)
    make_module = hydra.utils.instantiate(cfg.module, _partial_=True)  # objects go to the constructor directly
    return make_module(network=network, formulation=formulation, optimizer=optimizer, lr_scheduler=lr_scheduler,
                       augment_pipe=augment_pipe, data_shape=datamodule.data_shape,
                       num_classes=datamodule.num_classes, data_transform=datamodule.transform,
                       run_config=OmegaConf.to_container(cfg, resolve=True))


def build_logger(cfg: DictConfig, wandb_run_id: str | None = None):
    """``cfg.logger``; a W&B logger continues run ``wandb_run_id`` when given (a resumed training).
    ``~logger`` (no logger group) means no logger at all (False, so that Lightning does not add its default one)."""
    if not cfg.get("logger"):
        return False
    if wandb_run_id is not None and cfg.logger._target_.endswith("WandbLogger"):
        return hydra.utils.instantiate(cfg.logger, id=wandb_run_id, resume="allow")
    return hydra.utils.instantiate(cfg.logger)


def build_callbacks(cfg: DictConfig) -> list:
    """Every callback of ``cfg.callbacks`` that is not null, in config order (EMA first: see its config)."""
    return [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def load_module(ckpt_path: str, weights: str = "ema", map_location="cpu",
                pretrained: Mapping | None = None) -> DiffusionModule:
    """Rebuild a ``DiffusionModule`` in eval mode from a checkpoint written by ``train`` (the run's config,
    the data's shape, classes and transform are stored in it), or from a released checkpoint.

    ``weights="ema"`` loads the EMA average when the checkpoint has one, ``"raw"`` the trained weights; the
    choice made is in ``module.weights`` (``DiffusionModule.load_weights``).

    Released checkpoints (``lightning_diff.pretrained``: a ``.pkl``, ``.pt``/``.pth``, a folder, an ``https://``
    URL or ``hf://`` id, or any path when ``pretrained`` names a ``format``) are read by ``pretrained.load_pretrained``
    with the settings in ``pretrained`` (``format``, ``sha256`` and the format's own flags); the module holds the
    released weights (``module.weights == "released"``), its ``sampler`` is the source's, and its ``run_config`` is
    ``{"pretrained": {format, source, file, config, sampler, guidance}}`` (``file``: the local copy of a remote
    source; ``sampler``, ``guidance``: the source's defaults, ``Pretrained``), with no data section."""
    pretrained = dict(pretrained or {})
    if is_released(ckpt_path, pretrained):
        return _released_module(ckpt_path, pretrained, weights, map_location)
    if pretrained:
        raise ValueError(f"pretrained.{next(iter(pretrained))}=...: pretrained settings apply to released "
                         f"checkpoints only; ckpt={ckpt_path} was written by lightning-diff train (drop them)")
    checkpoint = load_checkpoint(ckpt_path, map_location=map_location)
    cfg = checkpoint.get("run_config")
    if cfg is None:
        raise ValueError(f"{ckpt_path} holds no run_config: it was not written by lightning_diff.cli.train")
    run_config, cfg = cfg, OmegaConf.create(cfg)
    shape, num_classes, transform = checkpoint["data_shape"], checkpoint["num_classes"], checkpoint["data_transform"]
    network = build_network(cfg, shape, num_classes, cfg.module.get("conditional", False))
    make_module = hydra.utils.instantiate(cfg.module, _partial_=True)
    module = make_module(network=network, formulation=hydra.utils.instantiate(cfg.formulation), data_shape=shape,
                         num_classes=num_classes, run_config=run_config,
                         grid=checkpoint.get("distillation", {}).get("sigmas"),  # a distilled student's levels
                         data_transform=None if transform is None else DataTransform(**transform))
    return module.load_weights(checkpoint, weights).eval()


def pretrained_flags(node) -> dict:
    """The ``pretrained:`` node of ``sample.yaml`` / ``evaluate.yaml`` as ``load_pretrained`` keywords (settings
    left null dropped, so that ``format`` is inferred and no digest is checked)."""
    flags = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    return {k: v for k, v in flags.items() if v is not None}


def is_released(ckpt_path, pretrained: Mapping | None = None) -> bool:
    """True when ``ckpt_path`` is read by ``lightning_diff.pretrained`` rather than as a ``train`` checkpoint:
    a remote source, a folder, a ``.pkl``/``.pt``/``.pth`` file, or any file when ``pretrained.format`` is set."""
    path = str(ckpt_path)
    return (remote.is_remote(path) or Path(path).is_dir() or Path(path).suffix in _RELEASED_SUFFIXES
            or (pretrained or {}).get("format") is not None)


def _released_module(ckpt_path, pretrained: dict, weights: str, map_location) -> DiffusionModule:
    if weights != "ema":
        raise ValueError(f"weights={weights}: a released checkpoint holds the one set of weights its authors "
                         f"published (EDM and DiT: the EMA); allowed: weights=ema (the default) for ckpt={ckpt_path}")
    released = load_pretrained(ckpt_path, map_location=map_location, **pretrained)
    record = json.loads(json.dumps({  # JSON-ready, for records; sampler and guidance: the source's defaults
        "format": released.format, "source": str(ckpt_path), "file": str(released.source), "config": released.config,
        "sampler": released.sampler, "guidance": released.guidance}, default=str))
    module = DiffusionModule(None, None, denoiser=released.denoiser, decoder=released.decoder,
                             conditional=released.num_classes > 0, num_classes=released.num_classes,
                             data_shape=released.data_shape, data_transform=released.data_transform,
                             sampler=released.sampler or None, run_config={"pretrained": record})
    return module.eval()


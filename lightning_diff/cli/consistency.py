"""``lightning-diff consistency``: consistency distillation from a teacher checkpoint (``mode=cd``) or consistency
training from data (``mode=ct``), one command as openai/consistency_models' ``cm_train.py --training_mode``
(``configs/consistency.yaml``; the method: ``methods.consistency``, docs/consistency.md)."""

from __future__ import annotations

import copy
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint_io import atomic_write
from ..config import CONFIG_DIR
from ..denoiser import Denoiser
from ..formulations import Formulation
from ..methods.consistency import ConsistencyTraining
from ..training.builders import build_datamodule, build_logger, build_network, load_module, pretrained_flags
from ..training.module import DiffusionModule
from .config_check import check_command

__all__ = ["consistency", "main", "METHOD_SETTINGS"]

# Settings of configs/consistency.yaml passed to ConsistencyTraining as they are (recorded in the checkpoint).
METHOD_SETTINGS = ("mode", "num_scales", "curriculum", "s0", "s1", "solver", "target_decay", "sigma_sampling",
                   "p_mean", "p_std", "weighting", "metric", "huber_c")


def consistency(cfg: DictConfig) -> dict:
    """Run ``lightning-diff consistency`` (configs/consistency.yaml) on a composed config and write the consistency
    model to ``cfg.out``. Returns ``{"model": path, "steps": optimizer steps, "init": "ckpt" | "scratch"}``.

    The model's network starts as the checkpoint's (``init=ckpt``, the default when ``ckpt`` is given: CD from its
    teacher as Song et al. 2023, CT from a diffusion model as Geng et al. 2024's ECT) or from scratch (``network=``).
    The result is a ``train`` checkpoint with ``formulation=consistency`` and ``sampler=consistency`` (``lightning-diff
    sample ckpt=out sampler=consistency sampler.steps=1``); from a released checkpoint's network it is
    ``{"model": state_dict, "formulation", "ckpt"}``, as ``lightning-diff distill`` writes for released teachers."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    loaded = None if cfg.ckpt is None else load_module(cfg.ckpt, weights=cfg.weights,
                                                       pretrained=pretrained_flags(cfg.pretrained))
    if loaded is not None and tuple(datamodule.data_shape) != tuple(loaded.data_shape):
        raise ValueError(f"consistency: data has shape {tuple(datamodule.data_shape)} but ckpt={cfg.ckpt} was trained "
                         f"on {tuple(loaded.data_shape)}; allowed: the checkpoint's data (data=...)")
    formulation = hydra.utils.instantiate(cfg.formulation)
    init = cfg.init or ("scratch" if loaded is None else "ckpt")
    model, conditional = _initial_model(cfg, init, loaded, formulation, datamodule)
    method = ConsistencyTraining(model, hydra.utils.instantiate(cfg.optimizer), conditional=conditional,
                                 teacher=loaded.denoiser if cfg.mode == "cd" else None,
                                 total_steps=cfg.trainer.max_steps, **{k: cfg[k] for k in METHOD_SETTINGS})
    trainer = hydra.utils.instantiate(cfg.trainer, logger=build_logger(cfg))
    trainer.fit(method, datamodule=datamodule)
    record = {**{k: cfg[k] for k in METHOD_SETTINGS}, "ckpt": cfg.ckpt, "init": init, "steps": trainer.global_step,
              "curriculum": method.curriculum, "target_decay": method.target_decay,
              "sigma_sampling": method.sigma_sampling, "weighting": method.weighting}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint(cfg, init, loaded, method.model, conditional, datamodule, record)
    atomic_write(out, lambda f: torch.save(checkpoint, f))  # an interrupted write leaves no partial file
    return {"model": str(out), "steps": trainer.global_step, "init": init}


def _initial_model(cfg: DictConfig, init: str, loaded: DiffusionModule | None, formulation: Formulation,
                   datamodule) -> tuple[Denoiser, bool]:
    """``(the consistency model before training, conditional)``: the loaded network under ``formulation``
    (``init=ckpt``; its inputs c_in, c_noise must be the formulation's) or a new ``network=`` one (``scratch``)."""
    if init == "scratch":
        conditional = bool(cfg.module.conditional) if loaded is None else loaded.conditional
        network = build_network(cfg, datamodule.data_shape, datamodule.num_classes, conditional)
        return Denoiser(network, formulation), conditional
    if loaded is None:
        raise ValueError("consistency: init=ckpt without a checkpoint; allowed: ckpt=<checkpoint> with it, or "
                         "init=scratch (or null)")
    _check_same_inputs(loaded.formulation, formulation, cfg.ckpt)
    if cfg.module.conditional != loaded.conditional:
        raise ValueError(f"consistency: module.conditional={cfg.module.conditional} but ckpt={cfg.ckpt} is "
                         f"{'' if loaded.conditional else 'un'}conditional; allowed: module.conditional="
                         f"{str(loaded.conditional).lower()} (the checkpoint's network)")
    denoiser = loaded.denoiser
    return Denoiser(copy.deepcopy(denoiser.backbone), formulation,
                    float32_preconditioning=denoiser.float32_preconditioning), loaded.conditional


def _check_same_inputs(source: Formulation, formulation: Formulation, ckpt: str) -> None:
    """ValueError unless the network of a model of ``source`` sees what ``formulation`` feeds it: the same
    ``c_in(sigma)`` and ``c_noise(sigma)`` over ``[sigma_min, sigma_max]`` (EDM with the same sigma_data)."""
    sigma = torch.logspace(torch.tensor(formulation.sigma_min).log10(), torch.tensor(formulation.sigma_max).log10(),
                           16, dtype=torch.float64)
    same = all(torch.allclose(getattr(source, c)(sigma), getattr(formulation, c)(sigma)) for c in ("c_in", "c_noise"))
    if not same:
        raise ValueError(f"consistency: init=ckpt, but ckpt={ckpt} (formulation={source.name}) feeds its network "
                         f"other inputs (c_in, c_noise) than formulation={formulation.name}; allowed: an EDM-"
                         "preconditioned checkpoint with the same formulation.sigma_data, or init=scratch")


def _checkpoint(cfg: DictConfig, init: str, loaded: DiffusionModule | None, model: Denoiser, conditional: bool,
                datamodule, record: dict) -> dict:
    """What ``cfg.out`` holds: a ``train`` checkpoint (``builders.load_module`` rebuilds it) whose run config is the
    checkpoint's (``init=ckpt``) or this command's (``scratch``) with this formulation and sampler; a released
    network's weights as ``{"model", "formulation", "ckpt", "consistency"}``."""
    settings = {"formulation": OmegaConf.to_container(cfg.formulation, resolve=True),
                "sampler": OmegaConf.to_container(cfg.sampler, resolve=True)}
    if init == "scratch":
        run_config = OmegaConf.to_container(cfg, resolve=True)
    elif "pretrained" not in (loaded.run_config or {}):
        run_config = copy.deepcopy(loaded.run_config)
        run_config.update(settings, paths=OmegaConf.to_container(cfg.paths, resolve=True))
        run_config["module"]["sampler"] = settings["sampler"]
    else:
        return {"model": model.state_dict(), "formulation": settings["formulation"], "ckpt": str(cfg.ckpt),
                "consistency": record}
    run_config["consistency"] = record  # what records and the leaderboard's options column name (mode cd / ct)
    run_config["own_sampler"] = settings["sampler"]  # sample/evaluate's default (SamplerSettings.of_run)
    transform = datamodule.transform if loaded is None else loaded.data_transform
    module = DiffusionModule(None, None, denoiser=model, conditional=conditional, sampler=settings["sampler"],
                             data_shape=datamodule.data_shape, num_classes=datamodule.num_classes,
                             data_transform=transform, run_config=run_config)
    checkpoint = {"state_dict": module.state_dict(), "global_step": record["steps"], "consistency": record}
    module.on_save_checkpoint(checkpoint)  # run config, data shape, classes and transform, the format stamp
    return checkpoint


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="consistency")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "consistency")  # every '+key' read, numbers and choices valid: before any work
    result = consistency(cfg)
    print(f"consistency model: {result['model']} ({cfg.mode}, {result['steps']} steps, init={result['init']}); "
          f"sample it: lightning-diff sample ckpt={result['model']} sampler=consistency sampler.steps=1")


if __name__ == "__main__":
    main()

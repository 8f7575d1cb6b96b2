"""Format ``diffusers``: a saved diffusers model or pipeline folder as our ``Denoiser`` around ``DiffusersBackbone``.

Accepted folders: a model folder (``config.json`` + weights) of a ``UNet2DModel`` or ``DiTTransformer2DModel``
(``Transformer2DModel`` with ``norm_type="ada_norm_zero"``, as the DiT pipelines on the Hub save it), or a
pipeline folder (``model_index.json``; ``unet/`` or ``transformer/``, ``scheduler/scheduler_config.json``,
optional ``vae/``). The formulation is our ``DDPM`` on the scheduler's own noise levels. Needs diffusers (extra
``pretrained``).
"""

from __future__ import annotations

import json
import pathlib
import warnings

import torch

from ..denoiser import Denoiser
from ..formulations import DDPM
from ..formulations.schedules import SPACINGS
from .base import Pretrained

__all__ = ["load", "PREDICTIONS", "SCHEDULER_FLAGS"]

MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")
MODEL_SUBFOLDERS = ("unet", "transformer")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers prediction_type -> ours
LEARNED_VARIANCES = ("learned", "learned_range")  # diffusers variance_type of a learned-variance head
# Flags for a model folder without a scheduler, with diffusers' names (DDPMScheduler's settings).
SCHEDULER_FLAGS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                   "trained_betas")


def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("format=diffusers needs diffusers; install the extra: pip install "
                          "'lightning_diff[pretrained]'") from err
    return diffusers


def _read_json(path: pathlib.Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _model_folder(path: pathlib.Path) -> pathlib.Path:
    """The folder holding the network's ``config.json`` (the folder itself, or a pipeline's unet/ transformer/)."""
    if (path / "model_index.json").exists():
        found = [path / sub for sub in MODEL_SUBFOLDERS if (path / sub / "config.json").exists()]
        if len(found) != 1:
            raise ValueError(f"format=diffusers: pipeline folder {path} has {len(found)} of the subfolders "
                             f"{MODEL_SUBFOLDERS} with a config.json; allowed: exactly one")
        return found[0]
    if (path / "config.json").exists():
        return path
    raise ValueError(f"format=diffusers: {path} has neither model_index.json (a pipeline) nor config.json (a model); "
                     "allowed: a folder saved by save_pretrained")


def load_model(folder: pathlib.Path, map_location="cpu") -> torch.nn.Module:
    """The diffusers network saved in ``folder`` (one of ``MODEL_CLASSES``), in eval mode on ``map_location``."""
    diffusers = _diffusers()
    name = _read_json(folder / "config.json").get("_class_name")
    if name not in MODEL_CLASSES:
        raise ValueError(f"format=diffusers: {folder}/config.json holds a {name!r}; "
                         f"allowed: {', '.join(MODEL_CLASSES)}")
    # Transformer2DModel is remapped to DiTTransformer2DModel; low_cpu_mem_usage=False: no `accelerate` needed.
    model = getattr(diffusers, name).from_pretrained(folder, low_cpu_mem_usage=False)
    if not isinstance(model, (diffusers.UNet2DModel, diffusers.DiTTransformer2DModel)):
        raise ValueError(f"format=diffusers: {folder} loads as {type(model).__name__}; allowed: UNet2DModel, "
                         "DiTTransformer2DModel (Transformer2DModel with norm_type='ada_norm_zero')")
    return model.to(map_location).eval()


def _scheduler_of_pipeline(path: pathlib.Path, flags: dict):
    """The pipeline's scheduler, built by diffusers from its config; flags may only repeat its settings."""
    diffusers = _diffusers()
    config_path = path / "scheduler" / "scheduler_config.json"
    config = _read_json(config_path)
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"format=diffusers: {config_path} names scheduler {name!r}, which diffusers "
                         f"{diffusers.__version__} does not have")
    scheduler = cls.from_config(config)
    for flag, value in flags.items():
        if scheduler.config.get(flag) != value:
            raise ValueError(f"format=diffusers: flag {flag}={value!r} contradicts {config_path} "
                             f"({flag}={scheduler.config[flag]!r})")
    return scheduler


def _default_scheduler(folder: pathlib.Path, flags: dict):
    """A ``DDPMScheduler`` from the flags, diffusers' defaults for the rest (stated in a warning)."""
    trained_betas = flags.get("trained_betas")
    if trained_betas is not None:  # T is len(trained_betas)
        T = flags.setdefault("num_train_timesteps", len(trained_betas))
        if T != len(trained_betas):
            raise ValueError(f"format=diffusers: flag num_train_timesteps={T} contradicts trained_betas "
                             f"({len(trained_betas)} entries); allowed: equal")
    scheduler = _diffusers().DDPMScheduler(**flags)
    unused = {"trained_betas"} | ({"beta_schedule", "beta_start", "beta_end"} if trained_betas is not None else set())
    defaults = {k: scheduler.config[k] for k in SCHEDULER_FLAGS if k not in flags and k not in unused}
    if defaults:
        warnings.warn(f"format=diffusers: {folder} is a model folder without a scheduler; using diffusers' "
                      f"DDPMScheduler defaults {defaults} (pass them as flags to set or confirm them)",
                      UserWarning, stacklevel=3)
    return scheduler


def _betas(scheduler, source) -> torch.Tensor:
    """float64 betas whose cumulative product is the scheduler's own ``alphas_cumprod`` (float32, the values
    diffusers trains and samples with): ``beta_0 = 1 - abar_0``, ``beta_t = 1 - abar_t / abar_{t-1}``."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(f"format=diffusers: the scheduler of {source} ({type(scheduler).__name__}) has no "
                         "alphas_cumprod; allowed: a DDPM-family scheduler (DDPMScheduler, DDIMScheduler, ...)")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])


def _prediction(scheduler, source) -> str:
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"format=diffusers: {source} has prediction_type={prediction_type!r}; "
                         f"allowed: {', '.join(PREDICTIONS)}")
    return PREDICTIONS[prediction_type]


def _variance_trained(model, scheduler, source) -> bool:
    """A learned-variance head: ``out_channels = 2 in_channels`` (what diffusers' pipelines split on)."""
    in_channels = model.config.in_channels
    out_channels = model.config.get("out_channels") or in_channels
    doubled = out_channels == 2 * in_channels
    variance_type = scheduler.config.get("variance_type")
    if variance_type in LEARNED_VARIANCES and not doubled:
        raise ValueError(f"format=diffusers: {source} has variance_type={variance_type!r} but the model has "
                         f"{out_channels} output channels for {in_channels} inputs; allowed: {2 * in_channels}")
    return doubled


def _formulation(scheduler, source) -> DDPM:
    spacing = scheduler.config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise ValueError(f"format=diffusers: {source} has timestep_spacing={spacing!r}; allowed: {SPACINGS}")
    betas = _betas(scheduler, source)
    return DDPM(num_timesteps=betas.numel(), betas=betas, prediction=_prediction(scheduler, source), spacing=spacing)


def _decoder(path: pathlib.Path, map_location):
    """``VAEDecoder`` of a pipeline's ``vae/`` (an ``AutoencoderKL``, its ``scaling_factor``), None without one."""
    if not (path / "vae" / "config.json").exists():
        return None
    from ..networks.diffusers_wrapper import VAEDecoder

    vae = _diffusers().AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False).to(map_location).eval()
    return VAEDecoder(vae, vae.config.scaling_factor)


def load(path: pathlib.Path, *, map_location="cpu", **flags) -> Pretrained:
    """A saved diffusers model or pipeline folder as our ``Denoiser``.

    The network is wrapped as ``DiffusersBackbone`` (``c_noise`` = the timestep index the model was trained on);
    the formulation is our ``DDPM`` with the scheduler's own ``alphas_cumprod`` (any ``beta_schedule`` or
    ``trained_betas``), ``prediction_type`` epsilon / v_prediction / sample -> ``eps`` / ``v`` / ``x0``, its
    ``timestep_spacing`` as the sampling spacing, and ``variance_trained`` for a learned-variance head.
    Sampling settings of the scheduler that are not part of the model (``clip_sample``, ``steps_offset``,
    ``set_alpha_to_one``, ``thresholding``) are recorded in ``config["scheduler"]`` and not applied.

    Flags (diffusers' names, ``SCHEDULER_FLAGS``): a model folder has no scheduler, so the flags build a
    ``DDPMScheduler`` (diffusers' defaults for the rest, with a warning); for a pipeline they must agree with its
    scheduler config. ``D(x; sigma)`` equals the source's x0-prediction at its training levels; between levels
    it snaps as the ``dit`` format does (nearest level's timestep, the given sigma in the preconditioning).
    """
    unknown = sorted(set(flags) - set(SCHEDULER_FLAGS))
    if unknown:
        raise ValueError(f"format=diffusers: unknown flags {unknown}; allowed: {', '.join(SCHEDULER_FLAGS)}")
    path = pathlib.Path(path)
    folder = _model_folder(path)
    model = load_model(folder, map_location)
    is_pipeline = folder != path
    if is_pipeline and (path / "scheduler" / "scheduler_config.json").exists():
        scheduler = _scheduler_of_pipeline(path, flags)
    else:
        scheduler = _default_scheduler(folder, dict(flags))
    from ..networks.diffusers_wrapper import DiffusersBackbone

    backbone = DiffusersBackbone(model)
    denoiser = Denoiser(backbone, _formulation(scheduler, path),
                        variance_trained=_variance_trained(model, scheduler, path))
    size = model.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    config = dict(model=type(model).__name__, model_config=dict(model.config), scheduler=type(scheduler).__name__,
                  scheduler_config=dict(scheduler.config), flags=flags)
    return Pretrained(denoiser=denoiser, data_shape=(model.config.in_channels, height, width),
                      num_classes=backbone.num_classes, format="diffusers", source=str(path), config=config,
                      decoder=_decoder(path, map_location) if is_pipeline else None)

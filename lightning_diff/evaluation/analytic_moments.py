"""The Analytic-DPM score moments of a trained ``DiffusionModule`` on its run's training data
(``lightning_diff.sampling.analytic_dpm``; docs/samplers.md#analytic-dpm): what ``lightning-diff sample`` and the
``vlb`` metric call for ``variance=analytic``. Here rather than in ``analytic_dpm`` because it rebuilds the
run's data module (``builders``), a layer above the samplers."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..sampling.analytic_dpm import ScoreMoments, cached_moments

__all__ = ["module_moments", "with_moments"]


def module_moments(module, sigmas: torch.Tensor, *, datamodule=None, num_samples: int = 1000, seed: int = 0,
                   batch_size: int = 250, cache_dir: str | os.PathLike | None = None) -> ScoreMoments:
    """The moments of a ``DiffusionModule`` on ``sigmas``, estimated on the training split of its run's data
    (``datamodule``, or rebuilt from ``module.run_config["data"]``) and cached (``cached_moments``). Integer image
    data give Thm 2's data-range bound ``[offset, 255 scale + offset]``. ``sigmas`` are snapped to the network's
    levels (``module.denoiser.round_sigma``), as the samplers do."""
    from omegaconf import OmegaConf

    from ..training.builders import build_datamodule

    if datamodule is None:
        data_config = (module.run_config or {}).get("data")
        if data_config is None:
            raise ValueError("variance='analytic' needs the run's training data to estimate the score moments, "
                             "but this module's run_config has no data section; allowed: a checkpoint written "
                             "by lightning-diff train, or analytic_dpm.estimate_moments with your data")
        datamodule = build_datamodule(OmegaConf.create(module.run_config))
    datamodule.setup()
    transform = datamodule.transform
    data_range = None if transform.levels is None else (transform.offset,
                                                        transform.scale * (transform.levels - 1) + transform.offset)
    data_tag = json.dumps((module.run_config or {}).get("data"), sort_keys=True, default=str)
    sigmas = module.denoiser.round_sigma(sigmas.to(torch.float64))  # the levels the sampler will visit
    was_training = module.training
    module.eval()
    try:
        return cached_moments(module.denoiser, datamodule.train_set, sigmas, cache_dir=cache_dir, data_tag=data_tag,
                              num_samples=num_samples, seed=seed, batch_size=batch_size, data_range=data_range,
                              conditional=bool(module.conditional), device=module.device)
    finally:
        module.train(was_training)


def with_moments(settings, module, *, num_samples: int = 1000, seed: int = 0, batch_size: int = 250,
                 cache_dir: str | os.PathLike | None = None):
    """The sampler setting ``settings`` (a ``SamplerSettings``) with ``options["moments"]`` estimated for ``module``
    on its grid (``module_moments``) when it asks for ``ddpm`` with ``variance=analytic`` and holds none; any
    other setting unchanged. What ``lightning-diff sample`` calls (settings ``analytic_dpm.*``)."""
    options = settings.options
    if settings.name != "ddpm" or options.get("variance") != "analytic" or options.get("moments") is not None:
        return settings
    moments = module_moments(module, settings.sigmas(module.formulation), num_samples=num_samples, seed=seed,
                             batch_size=batch_size, cache_dir=cache_dir)
    return dataclasses.replace(settings, options={**options, "moments": moments})

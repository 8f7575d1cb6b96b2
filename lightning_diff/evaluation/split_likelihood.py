"""Likelihood of a module on a data split: probability-flow ODE bits/dim (any formulation) and the discrete
variational bound (ddpm), each rank scoring its shard of the batches, sums all-reduced."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from rich.progress import Progress

from ..data.transforms import bpd_offset
from .analytic_moments import module_moments
from .likelihood import ode_bits_per_dim, vlb_bits_per_dim, vlb_sigmas
from .metrics import all_reduce_sum, shard
from .splits import split_batch, split_view

__all__ = ["LIKELIHOOD_METRICS", "split_bits_per_dim", "require_discrete", "split_vlb"]

LIKELIHOOD_METRICS = ("bpd", "vlb")  # scored on a data split (lightning_diff.evaluation.likelihood)


def _split_mean(module, datamodule, *, split: str, num_images: int | None, batch_size: int, seed: int,
                per_batch: Callable, what: str, progress: bool) -> tuple[float, dict]:
    """Mean over the first ``num_images`` images of ``split`` of ``per_batch(x_int, labels, generator) ->
    (values [B], nfe)``; each rank takes its block of batches, sums are all-reduced (every rank calls it).
    Batch ``j`` draws its randomness from ``seed + j``; ``info["nfe"]`` is the mean NFE per batch (and pass).
    The module runs unwrapped, in eval mode, with autograd on even under Lightning's inference mode (the ODE
    divergence needs it)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"metrics.{what}.batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
    dataset, split_used, count = split_view(datamodule, split)
    if num_images is not None:
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"metrics.{what}.num_images={num_images!r} is invalid; allowed: null or an "
                             "integer >= 1")
        count = min(count, num_images)
    batches = shard(math.ceil(count / batch_size))
    labels_wanted = module.conditional and module.num_classes
    total = torch.zeros(3, dtype=torch.float64)  # sum of values, images, sum of NFE over batches
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"{what} ({split_used} split)", total=len(batches))
            for j in batches:
                start = j * batch_size
                x_int, labels = split_batch(dataset, datamodule.transform, start, min(start + batch_size, count))
                generator = torch.Generator(module.device).manual_seed(seed + j)
                values, nfe = per_batch(x_int.to(module.device), labels.to(module.device) if labels_wanted else None,
                                        generator)
                total += torch.tensor([float(values.sum()), len(values), float(nfe)], dtype=torch.float64)
                bar.advance(task)
    finally:
        module.train(was_training)
    total = all_reduce_sum(total)
    num_batches = math.ceil(count / batch_size)
    return float(total[0] / total[1]), {"split": split_used, "num_images": int(total[1]),
                                        "nfe": float(total[2]) / max(num_batches, 1)}


def split_bits_per_dim(module, datamodule, *, split: str = "test", num_images: int | None = None, passes: int = 1,
                       batch_size: int = 64, seed: int = 0, sigma_min: float | None = None,
                       sigma_max: float | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                       divergence: str = "hutchinson", probes: int = 1, probe: str = "rademacher",
                       progress: bool = False) -> tuple[dict, dict]:
    """Probability-flow ODE bits/dim of ``module`` on ``split`` (test, or val when the data has none),
    uniform dequantization, the offset ``-log2(scale)`` of the data module's transform
    (docs/likelihood.md#bits-per-dim).

    Returns ``({"bpd": mean over images}, protocol)``; the protocol names the split used, the offset,
    the transform, passes, tolerances, divergence estimator, ODE range and mean NFE per batch and pass.
    """
    formulation, transform = module.formulation, datamodule.transform
    sigma_min = float(formulation.sigma_min if sigma_min is None else sigma_min)
    sigma_max = float(formulation.sigma_max if sigma_max is None else sigma_max)

    def per_batch(x_int, labels, generator):
        bpd, info = ode_bits_per_dim(module.denoiser, x_int, scale=transform.scale, offset=transform.offset,
                                     sigma_min=sigma_min, sigma_max=sigma_max, passes=passes, generator=generator,
                                     rtol=rtol, atol=atol, divergence=divergence, probes=probes, probe=probe,
                                     labels=labels)
        return bpd, info["nfe"] / passes

    bpd, info = _split_mean(module, datamodule, split=split, num_images=num_images, batch_size=batch_size, seed=seed,
                            per_batch=per_batch, what="bpd", progress=progress)
    protocol = {**info, "bpd_offset": bpd_offset(transform), "transform": dataclasses.asdict(transform),
                "dequantization": "uniform", "passes": passes, "rtol": rtol, "atol": atol, "divergence": divergence,
                "probes": probes, "probe": probe, "sigma_min": sigma_min, "sigma_max": sigma_max,
                "batch_size": batch_size, "seed": seed}
    return {"bpd": bpd}, protocol


def require_discrete(formulation):
    """``formulation`` when it has DDPM's discrete betas (the VLB needs them); else a ValueError naming it."""
    if not hasattr(formulation, "alphas_cumprod"):
        raise ValueError(f"metrics=[..., vlb]: the discrete variational bound needs the betas of a ddpm model; this "
                         f"checkpoint was trained with formulation={formulation.name!r}; allowed: ddpm (use "
                         "metrics=[bpd] for the ODE bits/dim of any formulation)")
    return formulation


def split_vlb(module, datamodule, *, split: str = "test", num_images: int | None = None, batch_size: int = 64,
              seed: int = 0, variance: str = "fixed_small", steps: int | None = None, spacing: str = "linspace",
              clip_denoised: bool = True, analytic_samples: int = 1000, analytic_cache_dir: str | None = None,
              progress: bool = False) -> tuple[dict, dict]:
    """The discrete variational bound of a ``ddpm`` model in bits/dim on ``split`` (Ho et al. 2020 eq. 5;
    no dequantization, no offset), over all T timesteps or the strided chain of ``steps`` timesteps of ``spacing``
    (``likelihood.vlb_sigmas``: a chain that holds timestep 0, checked before any work).
    ``variance="analytic"`` estimates the score moments on ``analytic_samples`` training items first (Bao et al.
    2022; cached under ``analytic_cache_dir``, ``analytic_moments.module_moments``). Returns
    ``({"vlb_bpd": mean}, protocol)``.

    Raises ValueError before any work when the formulation has no discrete betas."""
    formulation, transform = require_discrete(module.formulation), datamodule.transform
    grid = vlb_sigmas(formulation, steps, spacing)
    moments = None
    if variance == "analytic":
        moments = module_moments(module, grid, datamodule=datamodule, num_samples=analytic_samples, seed=seed,
                                 cache_dir=analytic_cache_dir)

    def per_batch(x_int, labels, generator):
        bpd, info = vlb_bits_per_dim(module.denoiser, x_int, formulation, scale=transform.scale,
                                     offset=transform.offset, variance=variance, moments=moments,
                                     steps=steps, spacing=spacing, clip_denoised=clip_denoised, labels=labels,
                                     generator=generator)
        return bpd, info["nfe"]

    vlb, info = _split_mean(module, datamodule, split=split, num_images=num_images, batch_size=batch_size, seed=seed,
                            per_batch=per_batch, what="vlb", progress=progress)
    protocol = {**info, "variance": variance, "clip_denoised": clip_denoised,
                "num_timesteps": formulation.num_timesteps, "steps": steps,
                "spacing": None if steps is None else spacing, "batch_size": batch_size, "seed": seed}
    if moments is not None:
        protocol["analytic_samples"] = moments.num_samples
    return {"vlb_bpd": vlb}, protocol


"""Samplers: plain functions with one signature over a sigma grid (the k-diffusion convention).

``fn(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, **options) -> Tensor``

- ``denoiser(x, sigma, **cond)`` takes ``sigma`` as a ``[B]`` tensor and returns the estimate of y in the
  sigma-frame ``x = y + sigma n`` (``Denoiser``, ``GaussianMixture`` or any outside model);
  ``cond={"labels": labels}`` passes conditioning.
- ``x`` is the start noise already multiplied by ``sigmas[0]`` (``initial_noise``); ``sigmas`` is a
  strictly decreasing 1-D tensor of levels >= 0 (``schedules`` or ``formulation.sampling_sigmas``); ending in 0 it
  returns samples, ending at ``sigma_N > 0`` it returns the state at ``sigma_N`` (k-diffusion; ``annealed_langevin``
  needs the 0).
- ``generator``: None, a ``torch.Generator`` or per-sample generators (``PerSampleGenerator`` / a list),
  so that sample i depends only on its seed whatever the batch size.
- ``denoiser.round_sigma`` (optional, e.g. ``Denoiser``'s): samplers snap the grid, and EDM's churned level,
  to the noise levels the network knows, as NVlabs/edm; ``denoiser.network_passes`` (optional, the guidance
  wrappers'): network passes per sample of one call (see ``core``).
- ``stats`` (a dict) receives ``nfe``, network forward passes per sample (a classifier-free-guided
  evaluation counts 2), and ``accepted``/``rejected`` for ``rk45``; ``callback`` receives
  ``{"i", "x", "sigma", "denoised", "nfe"}`` once per step (``euler``/``heun`` add ``sigma_hat``, the churned level,
  as k-diffusion's).
- Every sampler runs under ``@torch.no_grad()``, as k-diffusion's (``core``).
- Solver state is float64 by default (``dtype=``), as NVlabs/edm; the result has x's dtype.

``sample(name, denoiser, x, sigmas, **options)`` dispatches through ``SAMPLERS``.
"""

from __future__ import annotations

import inspect

import torch

from . import schedules
from .adaptive import rk45
from .ancestral import ddim, ddpm
from .dpm_solver import dpmpp_2m
from .edm import ablation, euler, heun
from .guidance import CFGDenoiser, ClassifierGuidance
from .langevin import annealed_langevin
from .noise import SEED_PROTOCOLS, PerSampleGenerator, initial_labels, initial_noise, randn_like
from .sde import euler_maruyama, pc

__all__ = [
    "SAMPLERS", "sample", "names", "euler", "heun", "ablation", "ddim", "ddpm", "euler_maruyama", "pc",
    "annealed_langevin", "dpmpp_2m", "rk45", "CFGDenoiser", "ClassifierGuidance", "PerSampleGenerator",
    "randn_like", "initial_noise", "initial_labels", "SEED_PROTOCOLS", "schedules",
]

SAMPLERS = {fn.__name__: fn for fn in (euler, heun, ablation, ddim, ddpm, euler_maruyama, pc,
                                       annealed_langevin, dpmpp_2m, rk45)}


def names() -> list[str]:
    """Registry names of all samplers."""
    return list(SAMPLERS)


def sample(name: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, **options) -> torch.Tensor:
    """Run sampler ``name`` (a key of ``SAMPLERS``) with keyword ``options``.

    Raises ``ValueError`` naming the allowed samplers or the sampler's allowed options on bad input.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not known; allowed: {', '.join(SAMPLERS)}")
    fn = SAMPLERS[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("denoiser", "x", "sigmas")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler={name}: unknown options {unknown}; allowed: {', '.join(allowed)}")
    return fn(denoiser, x, sigmas, **options)

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

from ..formulations import schedules
from .adaptive import rk45
from .ancestral import ddim, ddpm
from .consistency import consistency
from .dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_3m_sde, dpmpp_sde
from .edm import ablation, euler, heun
from .guidance import AutoGuidance, CFGDenoiser, ClassifierGuidance, Guidance
from .karras_ode import dpm_2, dpm_2_ancestral, euler_ancestral
from .langevin import annealed_langevin
from .multistep import deis, lms
from .noise import SEED_PROTOCOLS, PerSampleGenerator, initial_labels, initial_noise, randn_like
from .registry import SAMPLERS, names, sample
from .sde import euler_maruyama, pc
from .settings import SamplerSettings
from .unipc import unipc

__all__ = [
    "SAMPLERS", "sample", "names", "euler", "heun", "ablation", "ddim", "ddpm", "euler_maruyama", "pc",
    "annealed_langevin", "dpmpp_2m", "rk45", "euler_ancestral", "dpm_2", "dpm_2_ancestral", "lms",
    "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "deis", "consistency",
    "CFGDenoiser", "AutoGuidance", "Guidance",
    "ClassifierGuidance", "PerSampleGenerator",
    "randn_like", "initial_noise", "initial_labels", "SEED_PROTOCOLS", "schedules", "SamplerSettings",
]

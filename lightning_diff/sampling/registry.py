"""The sampler registry: ``SAMPLERS`` (name -> function) and ``sample(name, ...)``, which refuses unknown names and
options naming the allowed ones (``SamplerSettings`` and the commands go through it)."""

from __future__ import annotations

import inspect

import torch

from .adaptive import rk45
from .ancestral import ddim, ddpm
from .consistency import consistency
from .dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_3m_sde, dpmpp_sde
from .edm import ablation, euler, heun
from .karras_ode import dpm_2, dpm_2_ancestral, euler_ancestral
from .langevin import annealed_langevin
from .multistep import deis, lms
from .sde import euler_maruyama, pc
from .unipc import unipc

__all__ = ["SAMPLERS", "names", "sample"]

SAMPLERS = {fn.__name__: fn for fn in (euler, heun, ablation, ddim, ddpm, euler_maruyama, pc,
                                       annealed_langevin, dpmpp_2m, rk45, euler_ancestral, dpm_2, dpm_2_ancestral,
                                       lms, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde, unipc, deis,
                                       consistency)}


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

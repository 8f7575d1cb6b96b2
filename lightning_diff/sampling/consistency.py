"""Consistency sampling (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Algorithm 1; docs/consistency.md):
one network evaluation per grid level. The first level maps the start noise to data, ``x = f(x_T, T)``; every later
level ``tau`` re-noises the current sample to ``tau`` and maps it back,
``x_tau = x + sqrt(tau^2 - eps^2) z``, ``x = f(x_tau, tau)``, with ``eps = sigma_min`` the boundary of the
consistency function (``f(x, eps) = x``, ``formulations.Consistency``)."""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_grid, to_dtype
from .noise import randn_like

__all__ = ["consistency"]


def boundary_sigma(denoiser, formulation, default: float = 0.002) -> float:  # Song et al. 2023's eps (EDM's)
    """``eps`` of Algorithm 1, the level where ``f(x, eps) = x``: the ``sigma_min`` of ``formulation`` or of
    ``denoiser.formulation``, else ``default`` (a bare denoiser function)."""
    formulation = formulation or getattr(denoiser, "formulation", None)
    return float(getattr(formulation, "sigma_min", default))


@torch.no_grad()
def consistency(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
                formulation=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One-step and multistep consistency sampling (Song et al. 2023, Algorithm 1); NFE = N, one per level.

    Args:
        denoiser: the consistency function ``f(x, sigma[B], **cond)`` (a ``Denoiser`` with
            ``formulation=consistency``; any other denoiser's ``D`` makes this the "denoise, then re-noise" sampler).
        x: start ``[B, ...]`` = ``sigmas[0] * n`` (Algorithm 1's ``x_T ~ N(0, T^2 I)``).
        sigmas: decreasing ``[N + 1]`` ending in 0: ``T = tau_0 > tau_1 > ... > tau_{N-1} >= sigma_min``, the
            levels f is evaluated at (``formulations.Consistency.sampling_sigmas``: EDM's time steps without
            sigma_min). ``[T, 0]`` is one-step sampling.
        generator: noise of the re-noising steps (a ``PerSampleGenerator``: sample i depends only on seed i).
        formulation: its ``sigma_min`` is ``eps`` of the re-noising ``sqrt(tau^2 - eps^2)`` (None: the
            denoiser's formulation's, else Song et al.'s 0.002; ``boundary_sigma``).
        dtype: solver state dtype; the result has x's dtype.
    Returns:
        ``[B, ...]`` samples.
    """
    grid = check_grid(sigmas, x, "consistency", denoiser, ends_in_zero=True)
    eps = boundary_sigma(denoiser, formulation)
    if grid[-2] < eps:
        raise ValueError(f"sampler=consistency: sigmas has the level {grid[-2]:.6g} below sigma_min={eps:g}, where "
                         "the consistency function is not defined; allowed: levels >= sigma_min before the final 0")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, tau in enumerate(grid[:-1]):
        if i > 0:  # Algorithm 1, line 5: x_tau = x + sqrt(tau^2 - eps^2) z
            state = state + math.sqrt(tau**2 - eps**2) * randn_like(state, generator)
        denoised = evaluate(state, tau)  # lines 2 and 6: x = f(x_tau, tau)
        evaluate.report(i, state, tau, denoised)
        state = denoised
    return state.to(x.dtype)

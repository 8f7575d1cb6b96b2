"""k-diffusion's single-step samplers of the PF-ODE in sigma, ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et
al. 2022, eq. 4 with ``sigma(t) = t, s = 1``), optionally ancestral: ``euler_ancestral``, ``dpm_2``,
``dpm_2_ancestral`` (crowsonkb/k-diffusion ``sampling.py``: ``sample_euler_ancestral``, ``sample_dpm_2``,
``sample_dpm_2_ancestral``; the same names and options, docs/samplers.md#euler_ancestral).

An ancestral step from sigma to sigma' (``ancestral_step``) is a deterministic step down to ``sigma_down`` followed by
fresh noise of std ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma'^2``: DDIM's eq. 16 variance in the
sigma-frame (docs/samplers.md#ddim). ``dpm_2`` is DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r_1 = 1/2) in the
sigma-frame, where the noise prediction ``(x - D) / sigma`` is the slope: a half step in ``lambda = -log sigma``
(``sigma_mid = sqrt(sigma sigma')``) and the full step with the slope there.
"""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_grid, check_nonnegative, to_dtype
from .noise import randn_like

__all__ = ["euler_ancestral", "dpm_2", "dpm_2_ancestral", "ancestral_step", "ancestral_loop"]


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of an ancestral step from ``sigma`` to ``sigma_next`` (k-diffusion's
    ``get_ancestral_step``): ``sigma_up = min(sigma', eta sigma' sqrt(1 - sigma'^2 / sigma^2))`` (DDIM eq. 16 divided
    by ``sqrt(abar')``; capped at sigma' for eta > 1) and ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``. eta = 0: no
    noise."""
    if eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _dpm_solver_2(evaluate: Evaluator, state, sigma: float, slope, sigma_next: float):
    """One DPM-Solver-2 step in sigma (Lu et al. 2022, Algorithm 1, r_1 = 1/2): Euler to the midpoint in
    ``lambda = -log sigma``, ``sigma_mid = sqrt(sigma sigma')`` snapped to the network's levels, then the full step with
    the slope there (k-diffusion ``sample_dpm_2``). ``slope`` is ``(x - D(x; sigma)) / sigma``; ``[B, ...]`` in and
    out."""
    sigma_mid = evaluate.snap(math.exp(0.5 * (math.log(sigma) + math.log(sigma_next))))
    x_mid = state + (sigma_mid - sigma) * slope
    slope_mid = (x_mid - evaluate(x_mid, sigma_mid)) / sigma_mid
    return state + (sigma_next - sigma) * slope_mid


def ancestral_loop(name: str, denoiser, x, sigmas, step, *, eta: float, s_noise: float, generator, callback, stats,
                   cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """The loop k-diffusion's ancestral samplers share: at each level D, a deterministic ``step(evaluate, state,
    sigma, sigma_down, denoised)`` of the named solver to ``sigma_down`` (straight to D when it is 0, the Euler step
    to 0), then fresh noise of std ``s_noise sigma_up`` unless sigma' = 0 (``ancestral_step``). ``[B, ...]`` the
    state at ``sigmas[-1]`` in x's dtype."""
    grid = check_grid(sigmas, x, name, denoiser)
    check_nonnegative(name, eta=eta, s_noise=s_noise)
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised = evaluate(state, sigma)
        evaluate.report(i, state, sigma, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        state = denoised if sigma_down == 0 else step(evaluate, state, sigma, sigma_down, denoised)
        if sigma_next > 0 and sigma_up > 0:
            state = state + s_noise * sigma_up * randn_like(state, generator)
    return state.to(x.dtype)


@torch.no_grad()
def euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
                    dtype: torch.dtype = torch.float64, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``): an Euler step to ``sigma_down``, then noise of std
    ``s_noise sigma_up`` (``ancestral_step``) unless sigma' = 0. NFE = N. With ``s_noise = 1`` and eta <= 1 it is
    ``ddim(eta)`` (docs/samplers.md#equivalences); eta = 0 is ``euler``.

    Args:
        denoiser, x, sigmas, cond, dtype: as in ``euler``; ``generator`` draws the noise (per-sample generators:
            sample i depends only on seed i).
        eta: ancestral noise, >= 0 (1: DDPM's posterior variance).
        s_noise: scale of the fresh noise, >= 0.
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    def euler(evaluate, state, sigma, sigma_down, denoised):
        return state + (sigma_down - sigma) * (state - denoised) / sigma

    return ancestral_loop("euler_ancestral", denoiser, x, sigmas, euler, eta=eta, s_noise=s_noise, generator=generator,
                          callback=callback, stats=stats, cond=cond, dtype=dtype)


@torch.no_grad()
def dpm_2(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
          dtype: torch.dtype = torch.float64, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
          s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-2 in sigma with EDM's churn (k-diffusion ``sample_dpm_2``). Each step: EDM Algorithm 2's churn
    (``gamma = min(s_churn / N, sqrt 2 - 1)`` on ``[s_tmin, s_tmax]``, ``sigma_hat = (1 + gamma) sigma`` snapped to the
    network's levels, noise of std ``s_noise sqrt(sigma_hat^2 - sigma^2)``), then a DPM-Solver-2 step from sigma_hat
    (``_dpm_solver_2``); the step to sigma' = 0 is an Euler step. NFE = 2N - 1 (2N on a grid ending above 0).
    ``s_churn = 0`` (default): deterministic.

    Args:
        s_churn, s_tmin, s_tmax, s_noise: EDM Algorithm 2's churn, k-diffusion's names (``heun``'s ``S_churn``, ...).
        Others as in ``euler``.
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    grid = check_grid(sigmas, x, "dpm_2", denoiser)
    check_nonnegative("dpm_2", s_churn=s_churn, s_tmin=s_tmin, s_noise=s_noise)
    if not s_tmax >= s_tmin:
        raise ValueError(f"sampler=dpm_2: s_tmax={s_tmax} is invalid; allowed: a number >= s_tmin={s_tmin}")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        gamma = min(s_churn / (len(grid) - 1), math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = evaluate.snap(sigma * (1 + gamma)) if gamma > 0 else sigma
        if gamma > 0:  # EDM Algorithm 2, lines 5-6
            state = state + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * randn_like(state, generator)
        denoised = evaluate(state, sigma_hat)
        evaluate.report(i, state, sigma, denoised, sigma_hat=sigma_hat)
        slope = (state - denoised) / sigma_hat
        if sigma_next == 0:
            state = state + (sigma_next - sigma_hat) * slope  # Euler: lands on D
        else:
            state = _dpm_solver_2(evaluate, state, sigma_hat, slope, sigma_next)
    return state.to(x.dtype)


@torch.no_grad()
def dpm_2_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
                    dtype: torch.dtype = torch.float64, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-2 ancestral (k-diffusion ``sample_dpm_2_ancestral``): a DPM-Solver-2 step to ``sigma_down``
    (an Euler step when it is 0), then noise of std ``s_noise sigma_up`` unless sigma' = 0 (``ancestral_step``).
    NFE = 2N - 1 (2N - 2 + 1: the step to sigma' = 0 is Euler).

    Args:
        eta, s_noise: as in ``euler_ancestral``. Others as in ``euler``.
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    def solver_2(evaluate, state, sigma, sigma_down, denoised):
        return _dpm_solver_2(evaluate, state, sigma, (state - denoised) / sigma, sigma_down)

    return ancestral_loop("dpm_2_ancestral", denoiser, x, sigmas, solver_2, eta=eta, s_noise=s_noise,
                          generator=generator, callback=callback, stats=stats, cond=cond, dtype=dtype)

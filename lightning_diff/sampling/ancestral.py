"""Discrete-time samplers: DDIM with eta (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020),
written in the sigma-frame so that they run on any grid.

On a grid of noise levels the DDPM quantities follow from ``abar = 1 / (1 + sigma^2)`` (docs/formulations.md#ddpm:
``sigma = sqrt((1 - abar) / abar)``), with ``alpha_t = abar_t / abar_{t-1}`` and ``beta_t = 1 - alpha_t``
between consecutive grid points (what improved-diffusion's respacing does for strided grids).
"""

from __future__ import annotations

import math

import torch

from .. import analytic_dpm
from .core import Evaluator, check_choice, check_grid, round_sigma_of, to_dtype
from .noise import randn_like

__all__ = ["ddim", "ddpm", "DDPM_VARIANCES"]

DDPM_VARIANCES = ("fixed_small", "fixed_large", "analytic", "learned", "sn", "npr")


def _denoise(evaluate: Evaluator, state, sigma, clip_denoised: bool):
    """D(x; sigma), clamped to the data range [-1, 1] when ``clip_denoised`` (improved-diffusion)."""
    denoised = evaluate(state, sigma)
    return denoised.clamp(-1, 1) if clip_denoised else denoised


def ddim(denoiser, x, sigmas, *, eta: float = 0.0, clip_denoised: bool = False, generator=None, callback=None,
         stats=None, cond: dict | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in the sigma-frame; NFE = N.

    Dividing eq. 12 by ``sqrt(abar_{t-1})`` gives ``x' = D + sigma_down eps_hat + sigma_up z`` with
    ``eps_hat = (x - D) / sigma``, ``sigma_up^2 = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2`` (eq. 16's
    sigma_t(eta) over ``sqrt(abar_{t-1})``) and ``sigma_down^2 = sigma'^2 - sigma_up^2`` (docs/samplers.md#ddim).
    eta = 0 is deterministic DDIM (= Euler in sigma), eta = 1 is DDPM with the posterior variance.

    Args:
        eta: in [0, 1].
        clip_denoised: clamp D to [-1, 1] (images) and re-derive eps_hat from it, as improved-diffusion's
            ``ddim_sample``; off by default (the DDIM paper's code does not clip).
        Others as in ``euler``; ``generator`` draws the eta > 0 noise.
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    grid = check_grid(sigmas, x, "ddim", denoiser)
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"sampler=ddim: eta={eta!r} is invalid; allowed: 0 <= eta <= 1")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised = _denoise(evaluate, state, sigma, clip_denoised)
        evaluate.report(i, state, sigma, denoised)
        eps = (state - denoised) / sigma
        sigma_up = eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        state = denoised + sigma_down * eps
        if sigma_up > 0:
            state = state + sigma_up * randn_like(state, generator)
    return state.to(x.dtype)


def ddpm(denoiser, x, sigmas, *, variance: str = "fixed_small", moments: analytic_dpm.ScoreMoments | None = None,
         clip_denoised: bool = False, generator=None, callback=None, stats=None, cond: dict | None = None,
         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 written with the posterior of eq. 6-7); NFE = N.

    Each step draws ``x_{t-1} ~ N(mu~_t(x_t, x0_hat), var)`` in the VP frame ``x_t = sqrt(abar_t) x_sigma``,
    with ``x0_hat = D``, ``mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t)
    (1 - abar_{t-1}) / (1 - abar_t) x_t`` (eq. 7) and no noise on the last step.

    Args:
        variance: ``fixed_small`` (posterior beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t),
            ``fixed_large`` (beta_t; Ho et al. Sec. 3.2) or ``analytic`` (Bao et al. 2022 Thm 1, clipped to Thm 2's
            bounds: ``analytic_dpm.optimal_variances``; needs ``moments``), ``sn`` / ``npr`` (Extended-Analytic-DPM,
            Bao et al. ICML 2022: per element from the network's second-moment head, ``extended_analytic_dpm``) or
            ``learned`` (Nichol & Dhariwal
            2021 eq. 15: ``exp(v' log beta_t + (1 - v') log beta~_t)`` per element, ``v' = (v + 1) / 2`` from the
            network's extra channels, ``denoiser.forward_with_variance``; beta_t and beta~_t of the step between
            the two grid levels, i.e. re-derived on a strided grid as iDDPM's respacing does).
        moments: the score moments of this denoiser at every level of the grid (``analytic_dpm.estimate_moments``
            on training data; ``lightning-diff sample`` estimates and caches them); only with ``analytic``.
        clip_denoised: clamp x0_hat to [-1, 1] (Ho et al.'s and improved-diffusion's ``clip_denoised``);
            off by default here so that non-image data are not clipped.
        Others as in ``euler``.
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    grid = check_grid(sigmas, x, "ddpm", denoiser)
    check_choice("ddpm", "variance", variance, DDPM_VARIANCES)
    analytic = _analytic_variances(grid, variance, moments)
    learned = _VarianceHead(denoiser) if variance == "learned" else None
    if variance in ("sn", "npr"):  # Extended-Analytic-DPM (Bao et al. ICML 2022); imported here: no import cycle
        from ..extended_analytic_dpm import SecondMomentHead

        learned = SecondMomentHead(denoiser, variance)
    evaluate = Evaluator(denoiser if learned is None else learned, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x0 = _denoise(evaluate, state, sigma, clip_denoised)
        evaluate.report(i, state, sigma, x0)
        abar, abar_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        alpha = abar / abar_prev
        beta = 1 - alpha
        x_t = math.sqrt(abar) * state
        mean = (math.sqrt(abar_prev) * beta / (1 - abar) * x0
                + math.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * x_t)  # Ho et al. eq. 7
        x_prev = mean
        if sigma_next > 0:
            small = (1 - abar_prev) / (1 - abar) * beta
            if variance in ("sn", "npr"):
                std = learned.variance(sigma, sigma_next).to(dtype).sqrt()
            elif learned is not None:
                frac = (learned.v.to(dtype) + 1) / 2  # Nichol & Dhariwal 2021 eq. 15
                std = (0.5 * (frac * math.log(beta) + (1 - frac) * math.log(small))).exp()
            else:
                var = analytic[i] if analytic is not None else (small if variance == "fixed_small" else beta)
                std = math.sqrt(var)
            x_prev = mean + std * randn_like(mean, generator)
        state = x_prev / math.sqrt(abar_prev)
    return state.to(x.dtype)


class _VarianceHead:
    """``denoiser`` for ``ddpm variance=learned``: a call returns D and keeps the variance channels of the same
    network pass in ``.v`` (``denoiser.forward_with_variance``); ``round_sigma`` passes through."""

    def __init__(self, denoiser):
        if not callable(getattr(denoiser, "forward_with_variance", None)):
            raise ValueError(f"sampler=ddpm: variance='learned' needs a denoiser with a learned-variance head "
                             f"(forward_with_variance: a Denoiser trained with objective=hybrid or vlb, or a "
                             f"released learn_sigma model, or a guidance wrapper around one), got "
                             f"{type(denoiser).__name__}; allowed: variance=fixed_small, fixed_large or analytic")
        self.denoiser, self.round_sigma, self.v = denoiser, round_sigma_of(denoiser), None

    def __call__(self, x, sigma, **cond):
        D, self.v = self.denoiser.forward_with_variance(x, sigma, **cond)
        return D


def _analytic_variances(grid: list[float], variance: str, moments) -> list[float] | None:
    """Bao et al.'s optimal variance of each step of ``grid`` when ``variance == "analytic"`` (else None);
    ValueError naming the setting when ``moments`` is missing, of the wrong type or given without ``analytic``."""
    if variance != "analytic":
        if moments is not None:
            raise ValueError(f"sampler=ddpm: moments are only read with variance='analytic', got "
                             f"variance={variance!r}; allowed: variance=analytic, or moments=None")
        return None
    if not isinstance(moments, analytic_dpm.ScoreMoments):
        raise ValueError(f"sampler=ddpm: variance='analytic' needs moments=analytic_dpm.ScoreMoments (the score "
                         f"moments of this model on the grid), got {type(moments).__name__}; allowed: "
                         "analytic_dpm.estimate_moments on the training data (lightning-diff sample estimates "
                         "them, settings analytic_dpm.*)")
    return analytic_dpm.optimal_variances(torch.tensor(grid, dtype=torch.float64), moments).tolist()

"""Discrete-time samplers: DDIM with eta (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020),
written in the sigma-frame so that they run on any grid.

On a grid of noise levels the DDPM quantities follow from ``abar = 1 / (1 + sigma^2)`` (docs/formulations.md#ddpm:
``sigma = sqrt((1 - abar) / abar)``), with ``alpha_t = abar_t / abar_{t-1}`` and ``beta_t = 1 - alpha_t``
between consecutive grid points (what improved-diffusion's respacing does for strided grids).

Classifier guidance (``ClassifierGuidance``, docs/samplers.md#classifier-guidance) is applied by the samplers here, not
by the wrapper (``split_classifier_guidance``), so that it lands where guided-diffusion puts it: ``ddpm`` shifts the
ancestral mean by ``s Sigma grad_{x_t} log p`` (Dhariwal & Nichol 2021, Algorithm 1: ``p_sample(cond_fn=...)``),
``ddim`` adds the score term to the clipped x0 (their Algorithm 2: ``ddim_sample(cond_fn=...)``).
"""

from __future__ import annotations

import math

import torch

from ..formulations.posterior import ddpm_posterior
from . import analytic_dpm
from .core import Evaluator, check_choice, check_grid, network_passes, round_sigma_of, to_dtype
from .guidance import split_classifier_guidance
from .noise import randn_like

__all__ = ["ddim", "ddpm", "DDPM_VARIANCES"]

DDPM_VARIANCES = ("fixed_small", "fixed_large", "analytic", "learned", "sn", "npr")


def _denoise(evaluate: Evaluator, guidance_grad, state, sigma: float, clip_denoised: bool):
    """``(D, g)``: D(x; sigma) ``[B, ...]`` of the unguided model, clamped to the data range [-1, 1] when
    ``clip_denoised`` (improved-diffusion), and the classifier-guidance gradient ``g = s grad_x log p(c | x; sigma)``
    w.r.t. the sigma-frame x (``split_classifier_guidance``; None when unguided), both in the solver dtype."""
    denoised = evaluate(state, sigma)
    denoised = denoised.clamp(-1, 1) if clip_denoised else denoised
    if guidance_grad is None:
        return denoised, None
    grad = guidance_grad(state, evaluate.sigma_batch(sigma), **evaluate.cond)
    return denoised, None if grad is None else grad.to(evaluate.dtype)


@torch.no_grad()
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

    Classifier guidance (a ``ClassifierGuidance`` denoiser) is the score form, Dhariwal & Nichol 2021 Algorithm 2:
    ``eps_hat - sqrt(1 - abar) s grad_{x_t} log p``, i.e. ``D + sigma^2 s grad_x log p``, added after the clipping
    as guided-diffusion's ``condition_score``.
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    grid = check_grid(sigmas, x, "ddim", denoiser)
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"sampler=ddim: eta={eta!r} is invalid; allowed: 0 <= eta <= 1")
    model, guidance_grad = split_classifier_guidance(denoiser)
    evaluate = Evaluator(model, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised, grad = _denoise(evaluate, guidance_grad, state, sigma, clip_denoised)
        if grad is not None:
            denoised = denoised + sigma**2 * grad  # Algorithm 2 (score form), score = (D - x) / sigma^2
        evaluate.report(i, state, sigma, denoised)
        eps = (state - denoised) / sigma
        sigma_up = eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        state = denoised + sigma_down * eps
        if sigma_up > 0:
            state = state + sigma_up * randn_like(state, generator)
    return state.to(x.dtype)


@torch.no_grad()
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

    Classifier guidance (a ``ClassifierGuidance`` denoiser) is Dhariwal & Nichol 2021, Algorithm 1, as
    guided-diffusion's ``p_sample(cond_fn=...)``: ``mu <- mu + s Sigma grad_{x_t} log p(c | x_t)``, mu from the
    unguided (clipped) x0_hat, Sigma the step's variance above, fixed or learned. On the last step, which draws no
    noise, Sigma is 0 for ``fixed_small`` and guided-diffusion's clipped posterior variance for ``fixed_large`` and
    ``learned`` (``_step_variance``). The callback's ``denoised`` is the unguided x0_hat (their ``pred_xstart``).
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    grid = check_grid(sigmas, x, "ddpm", denoiser)
    check_choice("ddpm", "variance", variance, DDPM_VARIANCES)
    analytic = _analytic_variances(grid, variance, moments)
    model, guidance_grad = split_classifier_guidance(denoiser)
    learned = _VarianceHead(model) if variance == "learned" else None
    if variance in ("sn", "npr"):  # Extended-Analytic-DPM (Bao et al. ICML 2022); imported here: no import cycle
        from .analytic_dpm import SecondMomentHead

        learned = SecondMomentHead(model, variance)
    evaluate = Evaluator(model if learned is None else learned, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x0, grad = _denoise(evaluate, guidance_grad, state, sigma, clip_denoised)
        evaluate.report(i, state, sigma, x0)
        abar, abar_prev = _step_abar(sigma, sigma_next)
        posterior = ddpm_posterior(abar, abar_prev)
        x_t = math.sqrt(abar) * state
        mean = posterior.coef_x0 * x0 + posterior.coef_xt * x_t  # Ho et al. eq. 7
        x_prev = mean
        if grad is not None or sigma_next > 0:  # Sigma, the step's variance (an unguided last step draws no noise)
            var = _step_variance(variance, grid, i, learned, analytic, dtype)
            if grad is not None:
                # Dhariwal & Nichol 2021, Algorithm 1: mu + s Sigma grad_{x_t} log p(c | x_t), in the VP frame of mu;
                # the sigma-frame x = x_t / sqrt(abar_t) gives grad_{x_t} = grad_x / sqrt(abar_t).
                x_prev = x_prev + var * grad / math.sqrt(abar)
            if sigma_next > 0:
                x_prev = x_prev + var**0.5 * randn_like(x_prev, generator)
        state = x_prev / math.sqrt(abar_prev)
    return state.to(x.dtype)


def _step_abar(sigma: float, sigma_next: float) -> tuple[float, float]:
    """``(abar_t, abar_{t-1})`` of the step ``sigma -> sigma_next``, abar = 1 / (1 + sigma^2) (module docstring);
    ``ddpm_posterior`` of them gives beta_t and beta~_t, which is 0 on a step to sigma = 0."""
    return 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)


def _step_variance(variance: str, grid: list[float], i: int, learned, analytic: list[float] | None,
                   dtype: torch.dtype):
    """Sigma of step ``i`` of ``grid``, the variance of x_{t-1} given x_t in the VP frame: a float, or ``[B, ...]``
    for ``learned`` / ``sn`` / ``npr`` (from the step's network pass, held by ``learned``).

    On the step to sigma = 0 (beta~ = 0; only classifier guidance reads Sigma there) ``fixed_large`` and ``learned``
    take guided-diffusion's clipped posterior variance, the beta~ of the step before (improved-diffusion's
    ``posterior_log_variance_clipped``; ``fixed_large``: ``append(posterior_variance[1], betas[1:])``), or beta on a
    one-step grid, which has no step before."""
    beta, small = ddpm_posterior(*_step_abar(grid[i], grid[i + 1]))[:2]
    if variance == "fixed_small":
        return small
    if variance == "analytic":
        return analytic[i]
    if variance in ("sn", "npr"):
        return learned.variance(grid[i], grid[i + 1]).to(dtype)
    clipped = small if small > 0 else (ddpm_posterior(*_step_abar(grid[i - 1], grid[i])).variance if i > 0 else beta)
    if variance == "fixed_large":
        return beta if small > 0 else clipped
    frac = (learned.v.to(dtype) + 1) / 2  # Nichol & Dhariwal 2021 eq. 15
    return (frac * math.log(beta) + (1 - frac) * math.log(clipped)).exp()


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

    def network_passes(self, cond: dict, sigma=None) -> int:
        """The wrapped denoiser's passes per call (2 for a guided one, ``core.network_passes``)."""
        return network_passes(self.denoiser, cond, sigma)


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

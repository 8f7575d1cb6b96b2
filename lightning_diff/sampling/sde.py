"""Reverse-SDE samplers of Song et al. 2021 for any formulation: Euler-Maruyama on the interpolating family
between the PF-ODE and the reverse SDE, and the predictor-corrector sampler.

In the formulation's frame ``X = s(t) x_sigma`` the forward SDE is ``dX = f X dt + g dw`` with
``f = s'/s, g = s sqrt(2 sigma' sigma)`` and score ``(D(X/s; sigma) - X/s) / (s sigma^2)``
(docs/formulations.md#sde-view).
For every ``noise_scale`` lambda in [0, 1] the SDE

    dX = [f X - (1 + lambda^2) / 2 g^2 grad log p_t(X)] dt + lambda g dw_bar

has the same marginals p_t (Song et al. 2021, App. D.1 with noise variance lambda^2 g^2; EDM eq. 6 is the
same family with beta(t) = lambda^2 sigma'/sigma): lambda = 0 is the PF-ODE, lambda = 1 the reverse SDE.
"""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_choice, check_grid, to_dtype
from .langevin import langevin_correct
from .noise import randn_like

__all__ = ["euler_maruyama", "pc", "PREDICTORS"]

PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def _formulation_or_default(formulation, sampler: str):
    """The formulation whose SDE is integrated; None means sigma(t) = t, s = 1 (EDM's / VE in sigma)."""
    if formulation is None:
        from ..formulations.base import Formulation  # lazy: formulations import sampling.schedules

        return Formulation()
    needed = ("sigma", "sigma_deriv", "s", "s_deriv", "t_of_sigma", "f", "g")
    if not all(hasattr(formulation, m) for m in needed):
        raise ValueError(f"sampler={sampler}: formulation={formulation!r} is invalid; allowed: a Formulation")
    return formulation


def _em_step(evaluate: Evaluator, state, fm, t: float, t_next: float, noise_scale: float, last: bool,
             generator):
    """One Euler-Maruyama step of the interpolating family from t to t_next < t, on the sigma-frame state.

    The last step (to sigma = 0) is the noise-free probability-flow step (score_sde's noise removal).
    Returns ``(new sigma-frame state, D)``."""
    tt = torch.tensor(t, dtype=torch.float64)
    sig, s, f, g = (float(v) for v in (fm.sigma(tt), fm.s(tt), fm.f(tt), fm.g(tt)))
    s_next = float(fm.s(torch.tensor(t_next, dtype=torch.float64)))
    denoised = evaluate(state, sig)
    X = s * state
    score = (denoised - state) / (s * sig**2)  # grad_X log p_t(X), docs/formulations.md#sde-view
    lam2 = 0.0 if last else noise_scale**2
    dt = t_next - t
    X = X + (f * X - 0.5 * (1 + lam2) * g**2 * score) * dt
    if lam2 > 0:
        X = X + noise_scale * g * math.sqrt(-dt) * randn_like(X, generator)
    return X / s_next, denoised


@torch.no_grad()
def euler_maruyama(denoiser, x, sigmas, *, formulation=None, noise_scale: float = 1.0, generator=None,
                   callback=None, stats=None, cond: dict | None = None,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE family of ``formulation`` at ``t_i = t_of_sigma(sigmas_i)``; NFE N.

    Args:
        formulation: whose ``s, sigma, f, g`` define the SDE (None: sigma(t) = t, s = 1).
        noise_scale: lambda in [0, 1]; noise variance lambda^2 g^2, drift weight (1 + lambda^2) / 2 on
            g^2 times the score. 0 is Euler on the PF-ODE in t (EDM Algorithm 1 with ``solver="euler"``),
            1 is the reverse SDE of Song et al. 2021.
        Others as in ``euler``. The last step (to sigma = 0) adds no noise.
    Returns:
        ``[B, ...]`` samples in the sigma-frame (the data frame at sigma = 0).
    """
    grid = check_grid(sigmas, x, "euler_maruyama", denoiser)
    if not isinstance(noise_scale, (int, float)) or not 0 <= noise_scale <= 1:
        raise ValueError(f"sampler=euler_maruyama: noise_scale={noise_scale!r} is invalid; "
                         "allowed: 0 <= noise_scale <= 1")
    fm = _formulation_or_default(formulation, "euler_maruyama")
    times = fm.t_of_sigma(torch.tensor(grid, dtype=torch.float64)).tolist()
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i in range(len(grid) - 1):
        new, denoised = _em_step(evaluate, state, fm, times[i], times[i + 1], noise_scale, grid[i + 1] == 0,
                                 generator)
        evaluate.report(i, state, grid[i], denoised)
        state = new
    return state.to(x.dtype)


@torch.no_grad()
def pc(denoiser, x, sigmas, *, predictor: str = "reverse_diffusion", corrector_steps: int = 1,
       snr: float = 0.16, step_norm: str = "batch", formulation=None, generator=None, callback=None,
       stats=None, cond: dict | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Predictor-corrector sampler (Song et al. 2021, Algorithms 2-3): at each sigma_i, ``corrector_steps``
    Langevin steps with the signal-to-noise step rule, then one predictor step to sigma_{i+1}.
    NFE = N (corrector_steps + 1).

    Predictors:
        ``reverse_diffusion``: the reverse of the VE discretisation ``x_{i} = x_{i+1} + sqrt(sigma_i^2 -
        sigma_{i+1}^2) z`` in the sigma-frame:
        ``x' = x + (sigma^2 - sigma'^2) score + sqrt(sigma^2 - sigma'^2) z``
        (score_sde ``ReverseDiffusionPredictor`` for VE; for VP score_sde discretises in its own frame with
        beta_i, which agrees to first order).
        ``euler_maruyama``: one step of the reverse SDE of ``formulation`` (see ``euler_maruyama``).
    Final noise removal: the predictor's last step (to sigma = 0) adds no noise, so it returns D.

    Args:
        corrector_steps: Langevin steps per level (score_sde ``n_steps``; 0 turns the corrector off).
        snr: signal-to-noise ratio r of the step rule (score_sde: 0.16 for VE, 0.01-0.17 for VP).
        step_norm: ``batch`` (norms averaged over the batch: score_sde's ``LangevinCorrector``, the default;
            it couples the samples of a batch through two scalars) or ``sample`` (each sample's own norms,
            so sample i depends only on its seed; sound in high dimension where norms concentrate, unstable
            in 2-D where a sample near a mode has a tiny score norm and gets a huge step).
        formulation: for the ``euler_maruyama`` predictor (None: sigma(t) = t, s = 1).
        Others as in ``euler``.
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    grid = check_grid(sigmas, x, "pc", denoiser)
    check_choice("pc", "predictor", predictor, PREDICTORS)
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"sampler=pc: corrector_steps={corrector_steps!r} is invalid; "
                         "allowed: an integer >= 0")
    fm = _formulation_or_default(formulation, "pc")
    times = fm.t_of_sigma(torch.tensor(grid, dtype=torch.float64)).tolist()
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        for _ in range(corrector_steps):
            state = langevin_correct(evaluate, state, sigma, snr, step_norm, generator, sampler="pc")
        if predictor == "euler_maruyama":
            new, denoised = _em_step(evaluate, state, fm, times[i], times[i + 1], 1.0, sigma_next == 0,
                                     generator)
        else:
            denoised = evaluate(state, sigma)
            variance = sigma**2 - sigma_next**2
            new = state + variance * (denoised - state) / sigma**2
            if sigma_next > 0:
                new = new + math.sqrt(variance) * randn_like(new, generator)
        evaluate.report(i, state, sigma, denoised)
        state = new
    return state.to(x.dtype)

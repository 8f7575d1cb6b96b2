"""EDM's samplers (Karras et al. 2022): Euler and Heun on the PF-ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``
with optional churn (Algorithm 2), and the general Algorithm 1 in a formulation's own ``s(t), sigma(t)``
(NVlabs/edm ``ablation_sampler``)."""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_choice, check_grid, check_nonnegative, to_dtype
from .noise import randn_like

__all__ = ["euler", "heun", "ablation"]


def _churn_loop(denoiser, x, sigmas, *, name: str, second_order: bool, generator, callback, stats,
                cond: dict | None, dtype: torch.dtype, S_churn: float, S_tmin: float, S_tmax: float,
                S_noise: float) -> torch.Tensor:
    """EDM Algorithm 2 (first order unless ``second_order``); churn 0 is Algorithm 1 with sigma(t)=t. The grid
    and the churned level are snapped to the denoiser's noise levels (``core`` module docstring). The callback
    gets the grid level ``sigma`` and the churned ``sigma_hat`` (k-diffusion's payload)."""
    grid = check_grid(sigmas, x, name, denoiser)
    check_nonnegative(name, S_churn=S_churn, S_tmin=S_tmin, S_noise=S_noise)
    if not S_tmax >= S_tmin:
        raise ValueError(f"sampler={name}: S_tmax={S_tmax} is invalid; allowed: a number >= S_tmin={S_tmin}")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    num_steps = len(grid) - 1
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        # Algorithm 2 lines 4-6: gamma_i = min(S_churn / N, sqrt(2) - 1) on [S_tmin, S_tmax], then
        # raise the noise level to sigma_hat = (1 + gamma_i) sigma_i by adding fresh noise; sigma_hat is
        # snapped to the network's levels (NVlabs/edm: t_hat = net.round_sigma(t_cur + gamma * t_cur)).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = evaluate.snap(sigma * (1 + gamma)) if gamma > 0 else sigma
        if gamma > 0:
            state = state + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * randn_like(state, generator)
        denoised = evaluate(state, sigma_hat)
        evaluate.report(i, state, sigma, denoised, sigma_hat=sigma_hat)
        slope = (state - denoised) / sigma_hat  # line 7: d_i = (x_hat - D(x_hat; t_hat)) / t_hat
        x_next = state + (sigma_next - sigma_hat) * slope  # line 8: Euler step
        if second_order and sigma_next > 0:  # lines 9-11: trapezoidal correction unless sigma_{i+1} = 0
            slope_next = (x_next - evaluate(x_next, sigma_next)) / sigma_next
            x_next = state + (sigma_next - sigma_hat) * (0.5 * slope + 0.5 * slope_next)
        state = x_next
    return state.to(x.dtype)


@torch.no_grad()
def euler(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
          dtype: torch.dtype = torch.float64, S_churn: float = 0.0, S_tmin: float = 0.0,
          S_tmax: float = float("inf"), S_noise: float = 1.0) -> torch.Tensor:
    """First-order Euler on the PF-ODE in sigma (EDM eq. 4 with sigma(t) = t, s = 1); NFE = N.

    Args:
        denoiser: ``denoiser(x, sigma[B], **cond) -> estimate of y``.
        x: start ``[B, ...]`` = ``sigmas[0] * n``.
        sigmas: decreasing ``[N + 1]`` ending in 0.
        cond: keyword arguments for the denoiser (e.g. ``{"labels": labels}``).
        dtype: solver state dtype (float64, as NVlabs/edm); the result has x's dtype.
        S_churn, S_tmin, S_tmax, S_noise: EDM Algorithm 2 churn (off by default), as in ``heun``.
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    return _churn_loop(denoiser, x, sigmas, name="euler", second_order=False, generator=generator, callback=callback,
                       stats=stats, cond=cond, dtype=dtype, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax,
                       S_noise=S_noise)


@torch.no_grad()
def heun(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
         dtype: torch.dtype = torch.float64, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = float("inf"), S_noise: float = 1.0) -> torch.Tensor:
    """EDM Algorithm 2 (stochastic Heun); with ``S_churn = 0`` (default) it is the deterministic
    Algorithm 1 with sigma(t) = t, s = 1. NFE = 2N - 1 (the last step to sigma = 0 is an Euler step).

    Args:
        S_churn: total churn; gamma_i = min(S_churn / N, sqrt(2) - 1) for sigma_i in [S_tmin, S_tmax].
        S_tmin, S_tmax: sigma range where churn applies.
        S_noise: std of the added noise (EDM Table 5: 1.007 on CIFAR-10, 1.003 on ImageNet).
        Others as in ``euler``.
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    return _churn_loop(denoiser, x, sigmas, name="heun", second_order=True, generator=generator, callback=callback,
                       stats=stats, cond=cond, dtype=dtype, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax,
                       S_noise=S_noise)


ABLATION_SOLVERS = ("euler", "heun")


@torch.no_grad()
def ablation(denoiser, x, sigmas, *, formulation, solver: str = "heun", alpha: float = 1.0, generator=None,
             callback=None, stats=None, cond: dict | None = None,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM Algorithm 1 in the formulation's own time t, scaling s(t) and schedule sigma(t).

    Steps ``x_t = s(t) x_sigma`` over ``t_i = formulation.t_of_sigma(sigmas_i)`` with the ODE (EDM eq. 4)
    ``dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x / s; sigma)``. With ``solver="heun"`` the
    second stage is EDM's generalised Heun at ``t + alpha h`` weighted ``1 - 1/(2 alpha), 1/(2 alpha)``
    (alpha = 1: trapezoid, Algorithm 1). The last step (to sigma = 0) is an Euler step. NFE = 2N - 1 (heun)
    or N (euler). Works for any object with ``sigma, sigma_deriv, s, s_deriv, t_of_sigma``.

    Args:
        formulation: a ``Formulation`` (its schedule and scaling; the grid comes from ``sigmas``).
        solver: ``euler`` or ``heun``.
        alpha: Heun's intermediate point in (0, 1].
        Others as in ``euler``.
    Returns:
        ``[B, ...]`` samples in the sigma-frame (at sigma = 0 that is the data frame).
    """
    grid = check_grid(sigmas, x, "ablation", denoiser)
    check_choice("ablation", "solver", solver, ABLATION_SOLVERS)
    if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"sampler=ablation: alpha={alpha!r} is invalid; allowed: 0 < alpha <= 1")
    needed = ("sigma", "sigma_deriv", "s", "s_deriv", "t_of_sigma")
    if formulation is None or not all(hasattr(formulation, m) for m in needed):
        raise ValueError(f"sampler=ablation: formulation={formulation!r} is invalid; allowed: a Formulation "
                         f"(an object with {', '.join(needed)})")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    fm = formulation
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)
    times = fm.t_of_sigma(torch.tensor(grid, dtype=torch.float64)).tolist()

    def slope(state, t):
        """(d x / dt, D) at time t (EDM Algorithm 1 line 4)."""
        t = as_t(t)
        sig, sig_d, s, s_d = (float(v) for v in (fm.sigma(t), fm.sigma_deriv(t), fm.s(t), fm.s_deriv(t)))
        denoised = evaluate(state / s, sig)
        return (sig_d / sig + s_d / s) * state - sig_d * s / sig * denoised, denoised, sig

    state = float(fm.s(as_t(times[0]))) * to_dtype(x, dtype)  # x_0 ~ N(0, sigma(t_0)^2 s(t_0)^2 I)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        h = t_next - t
        d, denoised, sig = slope(state, t)
        evaluate.report(i, state / float(fm.s(as_t(t))), sig, denoised)
        if solver == "euler" or grid[i + 1] == 0:
            state = state + h * d
            continue
        t_mid = t_next if alpha == 1 else t + alpha * h  # exact at alpha = 1: the next grid level
        d_mid, _, _ = slope(state + alpha * h * d, t_mid)
        state = state + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * d_mid)
    return (state / float(fm.s(as_t(times[-1])))).to(x.dtype)

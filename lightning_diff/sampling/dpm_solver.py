"""The DPM-Solver++ family (Lu et al. 2022, "DPM-Solver++"), in the sigma-frame, with k-diffusion's stochastic
variants: ``dpmpp_2m``, ``dpmpp_2s_ancestral``, ``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde`` (crowsonkb/k-diffusion
``sampling.py``, the same names and options; docs/samplers.md#dpmpp_2m and the sections after it).

With ``lambda = -log sigma`` the data-prediction form of the PF-ODE is exactly integrable for a constant
D; 2M extrapolates D linearly in lambda from the previous step. Dividing Lu et al.'s VP update
``x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h} - 1) D`` by alpha_i gives the update below,
so the sigma-frame solver is the paper's solver for every VP/VE/flow schedule.

The SDE variants (k-diffusion's) take, over a step of length ``h`` in lambda, the step that is exact for a constant
D: ``x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + sigma' sqrt(1 - e^{-2 eta h}) z``; eta = 0 is the
PF-ODE's step, eta = 1 DDPM's posterior (mean ``D + (sigma'/sigma)^2 (x - D)``, std
``sigma' sqrt(1 - sigma'^2/sigma^2)``, docs/samplers.md#ddpm).

Noise: k-diffusion draws the SDE samplers' noise (``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``) from a
Brownian tree (torchsde) indexed by sigma; here it comes from the per-sample generators (``noise.randn_like``), so
sample i depends only on its seed. The increments over the disjoint steps of one run are independent Gaussians with
the variances the tree gives (the same marginals, the same distribution of the whole run); within a ``dpmpp_sde``
step the two sub-step increments are drawn as a Brownian bridge (``_bridge_increments``), as the tree gives them.
What is not kept: a tree returns the same Brownian path whatever the grid, so k-diffusion's runs with different
step counts share one path; here a different grid draws a different path.
"""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_choice, check_grid, check_nonnegative, to_dtype
from .karras_ode import ancestral_loop, ancestral_step
from .noise import randn_like

__all__ = ["dpmpp_2m", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "SDE_SOLVER_TYPES"]

SDE_SOLVER_TYPES = ("midpoint", "heun")  # dpmpp_2m_sde's second-order correction (k-diffusion's solver_type)


def _multistep_correction(denoised, history: list, h: float, h_eta: float, order: int, solver_type: str):
    """The higher-order term of a DPM-Solver++ multistep step, ``[B, ...]`` (0 without history).

    ``history`` holds ``(D_k, h_k)`` of the earlier steps, newest first; ``r_k = h_k / h``. Second order
    (k-diffusion's ``sample_dpmpp_2m_sde``): ``d = (D - D_1) / r_1`` weighted ``(1 - e^{-h_eta}) / 2`` (midpoint:
    DPM-Solver++(2M), Lu et al. 2022 Algorithm 2) or ``phi_2 = (e^{-h_eta} - 1) / h_eta + 1`` (heun). Third order
    (``sample_dpmpp_3m_sde``): the divided differences of D over the last three points, ``phi_2 d1 - phi_3 d2`` with
    ``phi_3 = phi_2 / h_eta - 1/2`` (the exponential integrator's phi functions at -h_eta). k-diffusion's weight of
    ``d2 ~ h^2 D''/2`` is half the Taylor expansion's (``-2 phi_3``), so its 3M is second order on the PF-ODE
    (docs/samplers.md#dpmpp_3m_sde); kept, since the sampler is k-diffusion's."""
    if not history:
        return 0.0
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    d1_0 = (denoised - history[0][0]) / (history[0][1] / h)
    if order == 2 or len(history) == 1:
        weight = -0.5 * math.expm1(-h_eta) if solver_type == "midpoint" else phi_2
        return weight * d1_0
    r0, r1 = history[0][1] / h, history[1][1] / h
    d1_1 = (history[0][0] - history[1][0]) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2


def _multistep(name: str, denoiser, x, sigmas, *, order: int, eta: float, s_noise: float, solver_type: str,
               generator, callback, stats, cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """DPM-Solver++(2M)/(3M) with ``eta`` of SDE noise (module docstring): per step, with ``h = log(sigma / sigma')``
    and ``h_eta = (1 + eta) h``, ``x' = (sigma'/sigma) e^{-eta h} x - (e^{-h_eta} - 1) D + correction +
    s_noise sigma' sqrt(1 - e^{-2 eta h}) z``. The first step is first order, the second at most second order, and the
    step to sigma' = 0 lands on D. NFE = N."""
    grid = check_grid(sigmas, x, name, denoiser)
    check_nonnegative(name, eta=eta, s_noise=s_noise)
    check_choice(name, "solver_type", solver_type, SDE_SOLVER_TYPES)
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    history = []
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised = evaluate(state, sigma)
        evaluate.report(i, state, sigma, denoised)
        if sigma_next == 0:  # lambda' = inf: the exact step of a constant D lands on D
            state = denoised
            break
        h = math.log(sigma / sigma_next)  # lambda_{i+1} - lambda_i
        h_eta = (1 + eta) * h
        state = (sigma_next / sigma) * math.exp(-eta * h) * state - math.expm1(-h_eta) * denoised
        state = state + _multistep_correction(denoised, history, h, h_eta, order, solver_type)
        if eta > 0 and s_noise > 0:
            state = state + s_noise * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * randn_like(state, generator)
        history = [(denoised, h), *history][: order - 1]
    return state.to(x.dtype)


@torch.no_grad()
def dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep on the PF-ODE; NFE = N. The first step and the last
    (to sigma = 0) are first order (DPM-Solver++(1) = DDIM), as in Lu et al.'s Algorithm 2:
    ``x' = (sigma'/sigma) x - (e^{-h} - 1) ((1 + 1/(2r)) D - 1/(2r) D_prev)``, ``r = h_prev / h``.

    Args:
        denoiser, x, sigmas, cond, dtype: as in ``euler``; ``generator`` is unused (deterministic).
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    return _multistep("dpmpp_2m", denoiser, x, sigmas, order=2, eta=0.0, s_noise=1.0, solver_type="midpoint",
                      generator=generator, callback=callback, stats=stats, cond=cond, dtype=dtype)


@torch.no_grad()
def dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
                 dtype: torch.dtype = torch.float64, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``; at eta = 1 with ``midpoint`` diffusers'
    ``algorithm_type="sde-dpmsolver++"``): the 2M step of the SDE with ``eta`` of noise (module docstring); eta = 0
    with ``midpoint`` is ``dpmpp_2m``. NFE = N.

    Args:
        eta: SDE noise, >= 0 (0: the PF-ODE, 1: the reverse SDE).
        s_noise: scale of the fresh noise, >= 0.
        solver_type: ``midpoint`` or ``heun``, the second-order correction (``_multistep_correction``).
        Others as in ``euler``; ``generator`` draws the noise (one independent Gaussian per step, module docstring).
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    return _multistep("dpmpp_2m_sde", denoiser, x, sigmas, order=2, eta=eta, s_noise=s_noise, solver_type=solver_type,
                      generator=generator, callback=callback, stats=stats, cond=cond, dtype=dtype)


@torch.no_grad()
def dpmpp_3m_sde(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
                 dtype: torch.dtype = torch.float64, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): three-step multistep (the second step second
    order with ``phi_2``, the first first order) on the SDE with ``eta`` of noise; eta = 0 is k-diffusion's
    DPM-Solver++(3M) on the PF-ODE, measured second order (``_multistep_correction``). NFE = N.

    Args:
        eta, s_noise: as in ``dpmpp_2m_sde``. Others as in ``euler``.
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    return _multistep("dpmpp_3m_sde", denoiser, x, sigmas, order=3, eta=eta, s_noise=s_noise, solver_type="heun",
                      generator=generator, callback=callback, stats=stats, cond=cond, dtype=dtype)


def _data_prediction_step(state, sigma: float, sigma_to: float, denoised):
    """DPM-Solver++(1) from sigma to ``sigma_to`` (Lu et al. 2022, the first-order data-prediction update = DDIM):
    ``(sigma_to / sigma) x - (e^{-h} - 1) D`` with ``h = log(sigma / sigma_to)``; ``[B, ...]``."""
    return (sigma_to / sigma) * state - math.expm1(-math.log(sigma / sigma_to)) * denoised


def _stage_level(evaluate: Evaluator, sigma: float, h: float, r: float) -> float | None:
    """The level of a two-stage step's stage, ``lambda + r h`` (Lu et al. 2022, Algorithm 1), i.e. ``sigma e^{-r h}``,
    snapped to the network's levels; None when snapping puts it on sigma itself (a grid as fine as a discrete network's
    levels), where the step is first order."""
    sigma_s = evaluate.snap(sigma * math.exp(-r * h))
    return None if sigma_s >= sigma else sigma_s


def _combined(evaluate: Evaluator, denoised, stage, sigma: float, sigma_s: float, h: float):
    """DPM-Solver++(2S)'s ``D_r = (1 - 1/(2r)) D + 1/(2r) D(u; s)`` with r the stage's actual fraction of h
    (Lu et al. 2022, Algorithm 1); r = 1/2 gives ``D(u; s)``. ``[B, ...]``; one network evaluation."""
    weight = h / (2 * math.log(sigma / sigma_s))  # 1 / (2 r)
    return (1 - weight) * denoised + weight * evaluate(stage, sigma_s)


@torch.no_grad()
def dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
                       dtype: torch.dtype = torch.float64, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (k-diffusion ``sample_dpmpp_2s_ancestral``): a DPM-Solver++(2S) step (Lu et al. 2022,
    Algorithm 1, r = 1/2) to ``sigma_down``, then noise of std ``s_noise sigma_up`` unless sigma' = 0
    (``karras_ode.ancestral_step``); the step to sigma_down = 0 is an Euler step. NFE = 2N - 1.

    Args:
        eta, s_noise: as in ``euler_ancestral``. Others as in ``euler``.
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    def solver_2s(evaluate, state, sigma, sigma_down, denoised):
        h = math.log(sigma / sigma_down)
        sigma_s = _stage_level(evaluate, sigma, h, r=0.5)
        if sigma_s is not None:
            stage = _data_prediction_step(state, sigma, sigma_s, denoised)
            denoised = _combined(evaluate, denoised, stage, sigma, sigma_s, h)
        return _data_prediction_step(state, sigma, sigma_down, denoised)

    return ancestral_loop("dpmpp_2s_ancestral", denoiser, x, sigmas, solver_2s, eta=eta, s_noise=s_noise,
                          generator=generator, callback=callback, stats=stats, cond=cond, dtype=dtype)


def _bridge_increments(state, generator, sigma: float, sigma_s: float, sigma_next: float):
    """Standard normals ``(z_s, z_next)`` ``[B, ...]`` for the Brownian increments of ``dpmpp_sde``'s two sub-steps,
    ``W(sigma) - W(sigma_s)`` and ``W(sigma) - W(sigma')`` over sigma' < sigma_s < sigma, each divided by the square
    root of its length (k-diffusion's ``BrownianTreeNoiseSampler``): the second contains the first, so
    ``z_next = (sqrt(sigma - sigma_s) z_s + sqrt(sigma_s - sigma') c) / sqrt(sigma - sigma')`` with c independent
    (the Brownian bridge; correlation ``sqrt((sigma - sigma_s) / (sigma - sigma'))``)."""
    z_s, c = randn_like(state, generator), randn_like(state, generator)
    z_next = (math.sqrt(sigma - sigma_s) * z_s + math.sqrt(sigma_s - sigma_next) * c) / math.sqrt(sigma - sigma_next)
    return z_s, z_next


@torch.no_grad()
def dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
              dtype: torch.dtype = torch.float64, eta: float = 1.0, s_noise: float = 1.0,
              r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): a two-stage DPM-Solver++ step in which each stage is an
    ancestral step (``karras_ode.ancestral_step`` with ``eta``): to the stage ``s = lambda + r h`` with noise over
    ``[sigma_s, sigma]``, then to sigma' with ``D_r = (1 - 1/(2r)) D + 1/(2r) D(u; s)`` and noise over
    ``[sigma', sigma]``; the two noises are one Brownian path's increments (``_bridge_increments``). The step to
    sigma' = 0 is Euler. NFE = 2N - 1.

    Args:
        eta, s_noise: as in ``euler_ancestral``.
        r: the stage's fraction of the step in lambda, 0 < r <= 1.
        Others as in ``euler``; ``generator`` draws two normals per step (module docstring).
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    grid = check_grid(sigmas, x, "dpmpp_sde", denoiser)
    check_nonnegative("dpmpp_sde", eta=eta, s_noise=s_noise)
    if not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"sampler=dpmpp_sde: r={r!r} is invalid; allowed: 0 < r <= 1")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised = evaluate(state, sigma)
        evaluate.report(i, state, sigma, denoised)
        if sigma_next == 0:
            state = denoised  # Euler to 0
            continue
        h = math.log(sigma / sigma_next)
        sigma_s = _stage_level(evaluate, sigma, h, r)
        down, up = ancestral_step(sigma, sigma_next, eta)
        noisy = eta > 0 and s_noise > 0
        if sigma_s is None:  # first order: one ancestral step
            z_next = randn_like(state, generator) if noisy else 0.0
        else:
            z_s, z_next = _bridge_increments(state, generator, sigma, sigma_s, sigma_next) if noisy else (0.0, 0.0)
            down_s, up_s = ancestral_step(sigma, sigma_s, eta)
            stage = _data_prediction_step(state, sigma, down_s, denoised) + s_noise * up_s * z_s
            denoised = _combined(evaluate, denoised, stage, sigma, sigma_s, h)
        state = _data_prediction_step(state, sigma, down, denoised) + s_noise * up * z_next
    return state.to(x.dtype)

"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"),
data prediction, in the sigma-frame: diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``, ``solver_type``
``bh1``/``bh2``, ``solver_order`` 1-3, ``lower_order_final``), docs/samplers.md#unipc.

With ``lambda = -log sigma`` and ``h = lambda' - lambda`` the exact step of the data-prediction PF-ODE is
``x' = (sigma'/sigma) x + sigma' int_lambda^lambda' e^{l} D dl``. UniP-p (the predictor) expands D around the current
point with the divided differences ``D1_k = (D_k - D) / r_k`` of the earlier points (``r_k = (lambda_k - lambda) / h``):

    x' = (sigma'/sigma) x - (e^{-h} - 1) D - B(h) sum_k a_k D1_k,

and UniC-p (the corrector) redoes the step that led to the current point once D is known there, adding the new point
to the expansion, at no extra network evaluation. ``B(h) = h`` (``bh1``) or ``e^h - 1`` (``bh2``), and the weights solve
``R a = g / B(h)`` with ``R_{ik} = r_k^i`` and ``g_i = i! (-h) phi_{i+1}(-h)`` (``phi_1(z) = (e^z - 1)/z``,
``phi_{k+1}(z) = (phi_k(z) - 1/k!)/z``): the order conditions of the exponential integrator. As diffusers: the order-2
predictor takes ``a = 1/2`` and the order-1 corrector ``a = 1/2``.

The corrected state continues the run; D is not re-evaluated there (UniPC's design), so NFE = N. The step to sigma = 0
is first order (``x = D``, the only order that stays finite as h -> inf: diffusers' ``lower_order_final`` makes it so).
"""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_choice, check_grid, to_dtype

__all__ = ["unipc", "UNIPC_ORDERS", "UNIPC_SOLVER_TYPES"]

UNIPC_ORDERS = (1, 2, 3)  # diffusers' solver_order (UniPC-p; with the corrector the accuracy is p + 1)
UNIPC_SOLVER_TYPES = ("bh1", "bh2")  # B(h) = h or e^h - 1 (Zhao et al. 2023)


def _order_weights(h: float, order: int, solver_type: str) -> tuple[float, float, torch.Tensor]:
    """``(e^{-h} - 1, B(h), g / B(h))`` with ``g_i = i! (-h) phi_{i+1}(-h)``, i = 1..order (float64 ``[order]``)."""
    z = -h
    h_phi_1 = math.expm1(z)  # z phi_1(z)
    b_h = z if solver_type == "bh1" else math.expm1(z)
    g, phi, factorial = [], h_phi_1 / z, 1  # phi_1
    for i in range(1, order + 1):
        phi = (phi - 1 / factorial) / z  # phi_{i+1}
        g.append(factorial * z * phi)
        factorial *= i + 1
    return h_phi_1, b_h, torch.tensor(g, dtype=torch.float64) / b_h


def _differences(points: list, order: int, h: float) -> tuple[torch.Tensor, list]:
    """``(r, D1)``: ``r_k = (lambda_k - lambda_0) / h`` (float64 ``[order - 1]``) and ``D1_k = (D_k - D_0) / r_k``
    (``[B, ...]`` each) of the earlier points ``points[1:order]``; ``points`` holds ``(lambda, D)``, newest first."""
    ratios = [(lam - points[0][0]) / h for lam, _ in points[1:order]]
    differences = [(d - points[0][1]) / r for (_, d), r in zip(points[1:order], ratios, strict=True)]
    return torch.tensor(ratios, dtype=torch.float64), differences


def _solve(ratios: torch.Tensor, g: torch.Tensor) -> list[float]:
    """The weights ``a`` of ``R a = g`` with ``R_{ik} = r_k^i`` (i = 0..p-1), ``[p]``."""
    powers = torch.arange(len(ratios), dtype=torch.float64)
    return torch.linalg.solve(ratios[None, :] ** powers[:, None], g).tolist()


def _weighted(weights: list[float], terms: list):
    """``sum_k a_k t_k`` (0 for no terms)."""
    return sum((a * t for a, t in zip(weights, terms, strict=True)), 0.0)


def _predict(state, sigma: float, sigma_next: float, points: list, order: int, solver_type: str):
    """UniP-p from sigma to sigma' (module docstring); ``points`` as in ``_differences``, the current point first.
    ``[B, ...]``."""
    h = math.log(sigma / sigma_next)
    h_phi_1, b_h, g = _order_weights(h, order, solver_type)
    ratios, differences = _differences(points, order, h)
    weights = [] if order == 1 else [0.5] if order == 2 else _solve(ratios, g[:-1])
    return (sigma_next / sigma) * state - h_phi_1 * points[0][1] - b_h * _weighted(weights, differences)


def _correct(state, sigma: float, sigma_next: float, points: list, denoised_next, order: int, solver_type: str):
    """UniC-p: the step from sigma (``state``; ``points`` as in ``_predict``) to sigma' redone with
    ``D(x'; sigma')`` = ``denoised_next`` added to the expansion at ``r = 1``. ``[B, ...]``."""
    h = math.log(sigma / sigma_next)
    h_phi_1, b_h, g = _order_weights(h, order, solver_type)
    ratios, differences = _differences(points, order, h)
    weights = [0.5] if order == 1 else _solve(torch.cat([ratios, torch.ones(1, dtype=torch.float64)]), g)
    correction = _weighted(weights[:-1], differences) + weights[-1] * (denoised_next - points[0][1])
    return (sigma_next / sigma) * state - h_phi_1 * points[0][1] - b_h * correction


@torch.no_grad()
def unipc(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
          dtype: torch.dtype = torch.float64, order: int = 2, solver_type: str = "bh2",
          lower_order_final: bool = True) -> torch.Tensor:
    """UniPC-p with data prediction (module docstring; diffusers' ``UniPCMultistepScheduler`` with ``predict_x0``):
    step i predicts with UniP of order ``p_i = min(order, i + 1)`` (``min(order, i + 1, N - i)`` with
    ``lower_order_final``), and each evaluation first corrects the step that led to it with UniC of that step's order.
    NFE = N.

    Args:
        order: 1, 2 or 3 (diffusers' ``solver_order``, default 2; Zhao et al. recommend 2 for guided, 3 for
            unguided sampling).
        solver_type: ``bh1`` (``B(h) = h``, for under 10 steps) or ``bh2`` (``B(h) = e^h - 1``, default).
        lower_order_final: lower the order of the last steps (diffusers' default); the step to sigma = 0 is first
            order either way.
        Others as in ``euler``; ``generator`` is unused (deterministic).
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    grid = check_grid(sigmas, x, "unipc", denoiser)
    check_choice("unipc", "order", order, UNIPC_ORDERS)
    check_choice("unipc", "solver_type", solver_type, UNIPC_SOLVER_TYPES)
    check_choice("unipc", "lower_order_final", lower_order_final, (True, False))
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    num_steps = len(grid) - 1
    state, points, last = to_dtype(x, dtype), [], None  # last: (state, sigma, order) of the previous step
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised = evaluate(state, sigma)
        evaluate.report(i, state, sigma, denoised)
        if last is not None:  # UniC: correct the previous step with D at its end
            state = _correct(last[0], last[1], sigma, points, denoised, last[2], solver_type)
        points = [(-math.log(sigma), denoised), *points][:order]
        if sigma_next == 0:
            state = denoised  # first order: the exact step of a constant D lands on D
            break
        step_order = min(order, i + 1, num_steps - i if lower_order_final else order)
        last = (state, sigma, step_order)
        state = _predict(state, sigma, sigma_next, points, step_order, solver_type)
    return state.to(x.dtype)

"""Linear multistep (Adams-Bashforth) samplers of the PF-ODE in sigma, ``dx/dsigma = eps(x; sigma) =
(x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 4 with s = 1): ``lms`` (k-diffusion's ``sample_lms``) and ``deis``
(Zhang & Chen 2023, "DEIS", the multistep exponential integrator in ``rho = sigma/alpha``, which is the sigma-frame's
sigma; diffusers' ``DEISMultistepScheduler``, ``solver_type="logrho"``).

Both extrapolate the last p slopes with a Lagrange polynomial and integrate it exactly over the step:

    x_{i+1} = x_i + sum_j c_j eps_{i-j},    c_j = int_{sigma_i}^{sigma_{i+1}} L_j(tau(rho)) d rho,

with ``L_j`` the Lagrange basis on the nodes ``tau_{i-k}``, ``tau = sigma`` (``lms``) or ``tau = log sigma``
(``deis``). For ``lms`` the integral is a polynomial's; for ``deis``, with ``u = log rho``,
``int P(u) e^u du = e^u (P - P' + P'' - ...)`` (exact, and 0 at rho = 0, so a step to sigma = 0 is defined). The
coefficients are exact (k-diffusion integrates them with ``scipy.integrate.quad``).
"""

from __future__ import annotations

import math

import torch
from numpy.polynomial import Polynomial

from .core import Evaluator, check_choice, check_grid, to_dtype

__all__ = ["lms", "deis", "DEIS_ORDERS"]

DEIS_ORDERS = (1, 2, 3)  # diffusers' DEISMultistepScheduler solver_order
DEIS_LOWER_ORDER_BELOW = 15  # diffusers: lower_order_final applies to runs of fewer steps than this


def _basis(nodes: list[float], j: int) -> Polynomial:
    """The Lagrange basis polynomial of node j on ``nodes``: 1 at ``nodes[j]``, 0 at the others."""
    return math.prod((Polynomial([-t, 1.0]) / (nodes[j] - t) for k, t in enumerate(nodes) if k != j),
                     start=Polynomial([1.0]))


def _adams_bashforth_weights(sigmas: list[float], sigma_next: float, log: bool) -> list[float]:
    """``c_j = int_{sigma_0}^{sigma'} L_j(tau(rho)) d rho`` for ``sigmas = [sigma_0, sigma_1, ...]`` (newest first),
    ``tau = log sigma`` when ``log`` else sigma. Nodes are shifted to the current point for conditioning."""
    if log:
        nodes = [math.log(s / sigmas[0]) for s in sigmas]

        def antiderivative(poly: Polynomial, rho: float) -> float:  # rho Q(log rho), Q = P - P' + P'' - ...
            if rho == 0:
                return 0.0
            q = sum(((-1) ** k) * poly.deriv(k) for k in range(poly.degree() + 1))
            return rho * q(math.log(rho / sigmas[0]))
    else:
        nodes = [s - sigmas[0] for s in sigmas]

        def antiderivative(poly: Polynomial, rho: float) -> float:
            return poly.integ()(rho - sigmas[0])
    bases = [_basis(nodes, j) for j in range(len(nodes))]
    return [antiderivative(p, sigma_next) - antiderivative(p, sigmas[0]) for p in bases]


def _adams_bashforth(name: str, denoiser, x, sigmas, *, orders, log: bool, callback, stats, cond, dtype):
    """The shared loop: step i of N uses the last ``orders(i, N)`` slopes (``_adams_bashforth_weights``). NFE = N."""
    grid = check_grid(sigmas, x, name, denoiser)
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    slopes = []  # eps at grid[i], grid[i - 1], ... (newest first)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised = evaluate(state, sigma)
        evaluate.report(i, state, sigma, denoised)
        order = orders(i, len(grid) - 1)
        slopes = [(state - denoised) / sigma, *slopes][:order]
        weights = _adams_bashforth_weights(grid[i::-1][:order], sigma_next, log)
        state = state + sum(w * d for w, d in zip(weights, slopes, strict=True))
    return state.to(x.dtype)


@torch.no_grad()
def lms(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
        dtype: torch.dtype = torch.float64, order: int = 4) -> torch.Tensor:
    """Linear multistep (k-diffusion ``sample_lms``): Adams-Bashforth in sigma of order ``min(i + 1, order)`` at step
    i (Lagrange interpolation of the slopes in sigma, module docstring). NFE = N.

    Args:
        order: the largest number of slopes used, an integer >= 1 (k-diffusion's default 4).
        Others as in ``euler``; ``generator`` is unused (deterministic).
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    if type(order) is not int or order < 1:
        raise ValueError(f"sampler=lms: order={order!r} is invalid; allowed: an integer >= 1")
    return _adams_bashforth("lms", denoiser, x, sigmas, orders=lambda i, n: min(i + 1, order), log=False,
                            callback=callback, stats=stats, cond=cond, dtype=dtype)


@torch.no_grad()
def deis(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
         dtype: torch.dtype = torch.float64, order: int = 2, lower_order_final: bool = True) -> torch.Tensor:
    """DEIS (Zhang & Chen 2023; diffusers ``DEISMultistepScheduler``, ``algorithm_type="deis"``,
    ``solver_type="logrho"``): Adams-Bashforth on ``dx/drho = eps`` with ``rho`` the sigma-frame's sigma and the slopes
    interpolated in ``log rho`` (module docstring); order ``min(i + 1, order)`` at step i. NFE = N.

    Args:
        order: 1, 2 or 3 (diffusers' ``solver_order``, default 2); order 1 is DDIM.
        lower_order_final: as diffusers, on runs of fewer than 15 steps the last step is first order and the one before
            at most second order.
        Others as in ``euler``; ``generator`` is unused (deterministic).
    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (samples when it is 0).
    """
    check_choice("deis", "order", order, DEIS_ORDERS)
    check_choice("deis", "lower_order_final", lower_order_final, (True, False))

    def orders(i: int, num_steps: int) -> int:
        lower = lower_order_final and num_steps < DEIS_LOWER_ORDER_BELOW
        return min(order, i + 1, num_steps - i if lower else order)

    return _adams_bashforth("deis", denoiser, x, sigmas, orders=orders, log=True, callback=callback, stats=stats,
                            cond=cond, dtype=dtype)

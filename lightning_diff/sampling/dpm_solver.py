"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), in the sigma-frame.

With ``lambda = -log sigma`` the data-prediction form of the PF-ODE is exactly integrable for a constant
D; 2M extrapolates D linearly in lambda from the previous step. Dividing Lu et al.'s VP update
``x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h} - 1) D`` by alpha_i gives the update below,
so the sigma-frame solver is the paper's solver for every VP/VE/flow schedule.
"""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_grid, to_dtype

__all__ = ["dpmpp_2m"]


@torch.no_grad()
def dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, stats=None, cond: dict | None = None,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep on the PF-ODE; NFE = N. The first step and the last
    (to sigma = 0) are first order (DPM-Solver++(1) = DDIM), as in Lu et al.'s Algorithm 2.

    Args:
        denoiser, x, sigmas, cond, dtype: as in ``euler``; ``generator`` is unused (deterministic).
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    grid = check_grid(sigmas, x, "dpmpp_2m", denoiser)
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    previous, h_previous = None, None
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        denoised = evaluate(state, sigma)
        evaluate.report(i, state, sigma, denoised)
        if sigma_next == 0:  # lambda_next = inf: the exact step of a constant D lands on D
            state = denoised
            break
        h = math.log(sigma / sigma_next)  # lambda_{i+1} - lambda_i
        if previous is None:
            estimate = denoised  # DPM-Solver++(1)
        else:
            r = h_previous / h  # Algorithm 2: r_i = h_{i-1} / h_i
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        state = (sigma_next / sigma) * state - math.expm1(-h) * estimate
        previous, h_previous = denoised, h
    return state.to(x.dtype)

"""Langevin dynamics on the noisy marginals ``p(x; sigma)``: the corrector of Song et al. 2021 and the
annealed Langevin sampler of NCSN (Song & Ermon 2019), both in the sigma-frame with score
``(D(x; sigma) - x) / sigma^2``."""

from __future__ import annotations

import math

import torch

from .core import Evaluator, check_choice, check_grid, to_dtype
from .noise import randn_like

__all__ = ["annealed_langevin", "langevin_correct", "STEP_NORMS"]

STEP_NORMS = ("sample", "batch")


def langevin_correct(evaluate: Evaluator, state: torch.Tensor, sigma: float, snr: float, step_norm: str,
                     generator, sampler: str) -> torch.Tensor:
    """One Langevin corrector step with the signal-to-noise rule (Song et al. 2021, Algorithm 4):
    ``eps = 2 alpha (r ||z|| / ||score||)^2``, ``x <- x + eps score + sqrt(2 eps) z`` with alpha = 1.

    ``step_norm="sample"`` uses each sample's norms; ``"batch"`` averages them over the batch (score_sde)."""
    check_choice(sampler, "step_norm", step_norm, STEP_NORMS)
    if not isinstance(snr, (int, float)) or not snr > 0:
        raise ValueError(f"sampler={sampler}: snr={snr!r} is invalid; allowed: a number > 0")
    score = (evaluate(state, sigma) - state) / sigma**2
    noise = randn_like(state, generator)
    view = (-1,) + (1,) * (state.ndim - 1)
    grad_norm = score.flatten(1).norm(dim=1)
    noise_norm = noise.flatten(1).norm(dim=1)
    if step_norm == "batch":
        grad_norm, noise_norm = grad_norm.mean().expand_as(grad_norm), noise_norm.mean().expand_as(noise_norm)
    step = (2 * (snr * noise_norm / grad_norm) ** 2).reshape(view)
    return state + step * score + (2 * step).sqrt() * noise


@torch.no_grad()
def annealed_langevin(denoiser, x, sigmas, *, step_size: float = 2e-5, steps_per_level: int = 100,
                      denoise_final: bool = True, generator=None, callback=None, stats=None,
                      cond: dict | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over the non-zero levels of ``sigmas``.

    For each level sigma_i, ``alpha_i = step_size * sigma_i^2 / sigma_L^2`` (sigma_L the smallest non-zero
    level) and ``steps_per_level`` updates ``x <- x + alpha_i / 2 score + sqrt(alpha_i) z``. NFE =
    L * steps_per_level (+ 1 with ``denoise_final``).

    Args:
        step_size: epsilon (paper: 2e-5 with sigma_1 = 1, sigma_L = 0.01, L = 10).
        steps_per_level: T (paper: 100).
        denoise_final: finish with the Tweedie step ``x <- D(x; sigma_L) = x + sigma_L^2 score``
            (NCSNv2 / Jolicoeur-Martineau et al. 2021; the final 0 of ``sigmas``). False returns the last
            Langevin iterate at sigma_L, as the NCSN paper.
        Others as in ``euler``.
    Returns:
        ``[B, ...]`` samples.
    """
    grid = check_grid(sigmas, x, "annealed_langevin", denoiser, ends_in_zero=True)
    if not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ValueError(f"sampler=annealed_langevin: step_size={step_size!r} is invalid; "
                         "allowed: a number > 0")
    if not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"sampler=annealed_langevin: steps_per_level={steps_per_level!r} is invalid; "
                         "allowed: an integer >= 1")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    state = to_dtype(x, dtype)
    levels = grid[:-1]
    for i, sigma in enumerate(levels):
        alpha = step_size * sigma**2 / levels[-1] ** 2  # Song & Ermon 2019, Algorithm 1 line 3
        for _ in range(steps_per_level):
            denoised = evaluate(state, sigma)
            noise = randn_like(state, generator)
            state = state + 0.5 * alpha * (denoised - state) / sigma**2 + math.sqrt(alpha) * noise
        evaluate.report(i, state, sigma, denoised)
    if denoise_final:
        state = evaluate(state, levels[-1])
    return state.to(x.dtype)

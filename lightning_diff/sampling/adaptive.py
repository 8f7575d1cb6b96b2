"""Adaptive Dormand-Prince RK5(4) on the PF-ODE in sigma, ``dx/dsigma = (x - D(x; sigma)) / sigma``.

Hand-written rather than scipy's ``solve_ivp`` or torchdiffeq (not a dependency) because it must run
batched on torch tensors on the GPU, and because each sample gets its own step size and error control:
the denoiser takes one sigma per row, so sample i's trajectory (and its error) depends only on its own
start, whatever the batch size. A solver with one step size for the flattened batch couples samples.
"""

from __future__ import annotations

import torch

from .core import Evaluator, check_grid, to_dtype

__all__ = ["rk45"]

# Dormand & Prince (1980) tableau: nodes C, stages A, 5th-order weights B (= the last stage row, FSAL),
# and E = B - B*, the difference to the embedded 4th-order weights (Hairer, Norsett & Wanner, Table 5.2).
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _rows(cond: dict, index: torch.Tensor, batch: int) -> dict:
    """The conditioning restricted to the rows ``index`` (tensors with a batch dimension are indexed)."""
    return {k: v[index] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch else v
            for k, v in cond.items()}


def _rms(v: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square ``[B]`` (Hairer's error norm)."""
    return v.flatten(1).pow(2).mean(dim=1).sqrt()


@torch.no_grad()
def rk45(denoiser, x, sigmas, *, rtol: float = 1e-5, atol: float = 1e-5, first_step: float | None = None,
         safety: float = 0.9, min_factor: float = 0.2, max_factor: float = 10.0, max_steps: int = 10_000,
         generator=None, callback=None, stats=None, cond: dict | None = None,
         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) with per-sample step-size control from ``sigmas[0]`` to the smallest
    non-zero ``sigmas[-2]``, then the Euler step to sigma = 0 (``x <- D``), as EDM's samplers end; a grid ending at
    ``sigmas[-1] > 0`` is integrated to that level and returned there, with no final step.
    The intermediate entries of ``sigmas`` are not used, and the stages evaluate the noise levels the step
    control picks: on a discrete formulation (``round_sigma`` not the identity) they lie between the
    network's levels, which fixed-grid samplers avoid.

    Step control as scipy's ``RK45``: error ``||E . k h / (atol + rtol max(|x|, |x_new|))||_rms <= 1``
    accepts; the next step is ``h * clip(safety err^(-1/5), min_factor, max_factor)`` (no growth right
    after a rejection). The first step follows Hairer's rule (one extra NFE) unless ``first_step`` is set.

    Args:
        rtol, atol: relative / absolute tolerances (score_sde: 1e-5; k-diffusion: 1e-4).
        first_step: initial |step| in sigma; None chooses it.
        safety, min_factor, max_factor: step-size controller constants (scipy's values).
        max_steps: raise ``RuntimeError`` after this many attempted steps (guards against a stiff model).
        Others as in ``euler``; ``generator`` is unused.
    Stats:
        ``nfe`` (batched denoiser calls, each on the rows still integrating), ``accepted`` and ``rejected``
        (long ``[B]``: steps per sample).
    Returns:
        ``[B, ...]`` samples at sigma = 0.
    """
    grid = check_grid(sigmas, x, "rk45", denoiser)
    for key, value in dict(rtol=rtol, atol=atol).items():
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"sampler=rk45: {key}={value!r} is invalid; allowed: a number > 0")
    evaluate = Evaluator(denoiser, x, dtype, cond, stats, callback)
    batch, device = x.shape[0], x.device
    view = (-1,) + (1,) * (x.ndim - 1)
    state = to_dtype(x, dtype)
    sigma_end = grid[-2] if grid[-1] == 0 else grid[-1]
    sigma = torch.full((batch,), grid[0], dtype=dtype, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    rejected = torch.zeros_like(accepted)

    def slope(xs, sig, rows):
        """dx/dsigma on the rows ``rows``."""
        cond_rows = _rows(evaluate.cond, rows, batch)
        return (xs - evaluate(xs, sig, cond_rows)) / sig.reshape(view)

    everyone = torch.arange(batch, device=device)
    k_first = slope(state, sigma, everyone)
    if grid[0] > sigma_end:
        if first_step is None:  # Hairer, Norsett & Wanner, Sec. II.4 "starting step size"
            scale = atol + rtol * state.abs()
            d0, d1 = _rms(state / scale), _rms(k_first / scale)
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
            h0 = torch.minimum(h0, sigma - sigma_end)
            k_probe = slope(state - h0.reshape(view) * k_first, sigma - h0, everyone)
            d2 = _rms((k_probe - k_first) / scale) / h0
            big = torch.maximum(d1, d2)
            h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / big) ** (1 / 5))
            step = torch.minimum(100 * h0, h1)
        else:
            step = torch.full((batch,), float(first_step), dtype=dtype, device=device)
        after_reject = torch.zeros(batch, dtype=torch.bool, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        attempts = 0
        while bool(active.any()):
            attempts += 1
            if attempts > max_steps:
                raise RuntimeError(f"sampler=rk45: max_steps={max_steps} reached before sigma={sigma_end}; "
                                   "raise max_steps or loosen rtol/atol")
            rows = active.nonzero().squeeze(1)
            x0, s0 = state[rows], sigma[rows]
            lands = step[rows] >= s0 - sigma_end
            h = -torch.where(lands, s0 - sigma_end, step[rows])  # negative: sigma decreases
            hv = h.reshape(view)
            ks = [k_first[rows]]
            for c, a in zip(C[1:], A[1:], strict=True):
                xi = x0 + hv * sum(coef * k for coef, k in zip(a, ks, strict=False))
                ks.append(slope(xi, s0 + c * h, rows))
            x_new = x0 + hv * sum(b * k for b, k in zip(B, ks, strict=True))
            ks.append(slope(x_new, s0 + h, rows))  # FSAL: the slope at the new point
            err = _rms(hv * sum(e * k for e, k in zip(E, ks, strict=True))
                       / (atol + rtol * torch.maximum(x0.abs(), x_new.abs())))
            ok = err <= 1
            factor = torch.where(err == 0, torch.full_like(err, max_factor),
                                 (safety * err.clamp(min=1e-300) ** -0.2).clamp(min_factor, max_factor))
            factor = torch.where(after_reject[rows] & ok, factor.clamp(max=1.0), factor)
            good = rows[ok]
            state[good] = x_new[ok]
            sigma[good] = torch.where(lands[ok], torch.full_like(s0[ok], sigma_end), s0[ok] + h[ok])
            k_first[good] = ks[-1][ok]
            accepted[good] += 1
            rejected[rows[~ok]] += 1
            after_reject[rows] = ~ok
            step[rows] = -h * factor
            active[good[lands[ok]]] = False
            evaluate.report(attempts - 1, state, sigma.clone(), state - sigma.reshape(view) * k_first)
    if stats is not None:
        stats["accepted"], stats["rejected"] = accepted, rejected
    if grid[-1] == 0:
        state = state - sigma_end * k_first  # Euler step to sigma = 0: x - sigma (x - D) / sigma = D
    return state.to(x.dtype)

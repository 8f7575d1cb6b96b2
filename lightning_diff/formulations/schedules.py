"""Sigma grids for sampling.

Every function returns a decreasing 1-D float64 tensor of noise levels that ends in 0 (the
k-diffusion / EDM convention: ``num_steps`` steps need ``num_steps + 1`` entries). Grids are built
in float64 so that the step sizes of a 1000-step schedule are not rounded away.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import torch

__all__ = [
    "append_zero",
    "karras_sigmas",
    "vp_sigmas",
    "ve_sigmas",
    "loglinear_sigmas",
    "iddpm_sigmas",
    "ddpm_timesteps",
    "ddpm_sigmas",
    "respace_timesteps",
    "rf_sigmas",
    "SPACINGS",
]

SPACINGS = ("linear", "quadratic", "leading", "trailing", "linspace", "respace", "respace_ddim")


def _check_steps(num_steps: int, minimum: int = 1) -> None:
    if not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"num_steps={num_steps!r} is invalid: expected an integer >= {minimum}")


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append the final noise level 0 to a 1-D grid ``[N] -> [N + 1]``."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """EDM time steps (Karras et al. 2022, eq. 5 / Table 1 "EDM" column).

    ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, i < N,
    then 0. Returns ``[num_steps + 1]`` float64.
    """
    _check_steps(num_steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64, device=device)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return append_zero(sigmas)


def vp_sigmas(num_steps: int, sigma_fn, epsilon_s: float = 1e-3, device=None) -> torch.Tensor:
    """VP time steps (EDM Table 1, VP column): ``t_i = 1 + i/(N-1) (epsilon_s - 1)``, ``sigma(t_i)``.

    ``sigma_fn`` maps a float64 tensor of times to noise levels. Returns ``[num_steps + 1]``.
    """
    _check_steps(num_steps)
    t = 1 + torch.linspace(0, 1, num_steps, dtype=torch.float64, device=device) * (epsilon_s - 1)
    return append_zero(sigma_fn(t))


def ve_sigmas(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0, device=None) -> torch.Tensor:
    """VE time steps (EDM Table 1, VE column): ``t_i = sigma_max^2 (sigma_min^2/sigma_max^2)^(i/(N-1))``,
    ``sigma = sqrt(t)``: a geometric sequence from sigma_max to sigma_min. Returns ``[num_steps + 1]``."""
    _check_steps(num_steps)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64, device=device)
    t = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** ramp
    return append_zero(t.sqrt())


def loglinear_sigmas(num_steps: int, sigma_min: float, sigma_max: float, device=None) -> torch.Tensor:
    """Noise levels uniform in ``log sigma`` from sigma_max down to sigma_min (k-diffusion's
    ``get_sigmas_exponential``). Returns ``[num_steps + 1]``."""
    _check_steps(num_steps)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64,
                                device=device)
    return append_zero(log_sigmas.exp())


def iddpm_sigmas(num_steps: int, u: torch.Tensor, j0: int = 8) -> torch.Tensor:
    """iDDPM time steps (EDM Table 1): ``u_{floor(j0 + (M-1-j0)/(N-1) i + 1/2)}`` for i < N, then 0.

    ``u`` is the decreasing grid ``[M + 1]`` with ``u[M] = 0`` (see ``formulations.discrete``).
    """
    _check_steps(num_steps, minimum=2)
    M = u.numel() - 1
    i = torch.arange(num_steps, dtype=torch.float64)
    j = torch.floor(j0 + (M - 1 - j0) / (num_steps - 1) * i + 0.5).long()
    return append_zero(u.to(torch.float64)[j.to(u.device)])


def ddpm_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linear") -> torch.Tensor:
    """The 0-based timestep indices a strided DDPM/DDIM sampler visits, largest first, exactly as the code
    each rule comes from computes them (numpy float64: an ulp decides a floor or a .5).

    - ``linear``: the DDIM code's ``skip_type="uniform"`` (ermongroup/ddim, ``runners/diffusion.py``):
      ``range(0, T, T // N)``; that is ``ceil(T / (T // N))`` timesteps, more than N when N does not
      divide T (N = 30 of 1000: stride 33, 31 timesteps).
    - ``quadratic``: the DDIM code's ``skip_type="quad"`` (its CIFAR-10 choice; Song et al. 2021, App. D.2):
      ``int(s)`` of ``linspace(0, sqrt(0.8 T), N) ** 2``. From N = 30 at T = 1000 the smallest indices
      repeat (0, 0, 0, 1, ...); they are kept here, see ``ddpm_sigmas`` for how a repeat is run.
    - ``leading``, ``trailing``, ``linspace``: diffusers' ``DDIMScheduler.set_timesteps`` (Lin et al. 2024,
      Table 2) with ``steps_offset=0``: ``(T // N) i``, ``round(T - i T / N) - 1``,
      ``round(linspace(0, T - 1, N))``, N entries each. diffusers' ``trailing`` takes
      ``np.arange(T, 0, -T / N)``, which overshoots to N + 1 entries ending in -1 for some N (62 of
      1..1000 at T = 1000); for those N this is the closed form ``round(T - i T / N) - 1``, i < N, in
      exact arithmetic (ties to even, as numpy rounds).
    - ``respace``, ``respace_ddim``: guided-diffusion's ``space_timesteps(T, "N")`` and ``(T, "ddimN")``
      (``respace.py``; improved-diffusion's and DiT's are the same function): ``respace_timesteps``.

    Returns a long tensor ``[K]``, largest index first (K = N except ``linear`` as above).
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps!r} is invalid; allowed: an integer >= 1")
    _check_steps(num_steps)
    if num_steps > num_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the formulation's {num_timesteps} timesteps")
    T, N = num_timesteps, num_steps
    if spacing == "linear":
        idx = list(range(0, T, T // N))
    elif spacing == "quadratic":
        idx = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), N) ** 2]
    elif spacing == "leading":
        idx = list(np.arange(N) * (T // N))
    elif spacing == "trailing":
        idx = (np.round(np.arange(T, 0, -T / N)) - 1).astype(np.int64).tolist()[::-1]
        if len(idx) != N:  # np.arange overshot: the closed form (Fraction rounds ties to even)
            idx = [round(Fraction(T * (N - i), N)) - 1 for i in reversed(range(N))]
    elif spacing == "linspace":
        idx = list(np.linspace(0, T - 1, N).round())
    elif spacing in ("respace", "respace_ddim"):
        idx = respace_timesteps(T, N, ddim=spacing == "respace_ddim")
    else:
        raise ValueError(f"spacing={spacing!r} is not known; allowed: {', '.join(SPACINGS)}")
    return torch.tensor(idx, dtype=torch.long).flip(0)


def respace_timesteps(num_timesteps: int, num_steps: int, ddim: bool = False) -> list[int]:
    """guided-diffusion's ``space_timesteps`` with one section, increasing: the timesteps its respaced samplers
    (``timestep_respacing``) visit.

    - ``ddim=False`` (``"N"``): ``round(k s)`` for k < N, s = (T - 1) / (N - 1) accumulated in floating point as
      the reference adds it (an accumulated .5 can round the other way than ``linspace``'s: 278 of 1..1000 differ
      at T = 1000), so the first is 0 and the last T - 1.
    - ``ddim=True`` (``"ddimN"``): ``range(0, T, i)`` with the smallest stride i in [1, T) that gives exactly N
      timesteps; ValueError naming the spacing when no stride does (N = 999 of T = 1000).
    """
    T, N = num_timesteps, num_steps
    if ddim:
        stride = next((i for i in range(1, T) if len(range(0, T, i)) == N), None)
        if stride is None:
            raise ValueError(f"spacing='respace_ddim' with num_steps={N} of {T}: no integer stride gives exactly {N} "
                             f"timesteps (guided-diffusion's 'ddim{N}'); allowed: len(range(0, {T}, i)) for an "
                             "integer stride i, e.g. 10, 25, 50, 100, 250")
        return list(range(0, T, stride))
    stride, position, idx = (T - 1) / (N - 1) if N > 1 else 1, 0.0, []
    for _ in range(N):
        idx.append(round(position))
        position += stride
    return idx


def ddpm_sigmas(timestep_sigmas: torch.Tensor, num_steps: int, spacing: str = "linear") -> torch.Tensor:
    """Sigma grid of a strided DDPM/DDIM sampler: the distinct timesteps of ``ddpm_timesteps`` as noise
    levels, largest first, then 0. Returns float64 ``[K + 1]``, K the number of distinct timesteps.

    ``timestep_sigmas`` ``[T]`` is the noise level of timestep index 0..T-1 (increasing). A repeated index
    (``quadratic`` from N = 30 at T = 1000) is dropped: the DDIM code runs it as a step from t to the same
    t, an identity step for DDIM (any eta) and DDPM (beta_t = 0) that still costs a network evaluation, so
    the reference spends N evaluations where this grid spends K. Warns whenever K != N.
    """
    T = timestep_sigmas.numel()
    visited = ddpm_timesteps(T, num_steps, spacing)
    distinct = torch.unique(visited).flip(0)  # unique sorts ascending
    if distinct.numel() != num_steps:
        repeats = visited.numel() - distinct.numel()
        what = (f"{repeats} repeated timesteps are dropped (the DDIM code runs them as identity steps t -> t, "
                f"{visited.numel()} network evaluations)" if repeats else
                f"range(0, {T}, {T // num_steps}) visits {visited.numel()} timesteps (the DDIM code's stride)")
        warnings.warn(f"spacing={spacing!r} with num_steps={num_steps} of {T}: {what}; the grid has "
                      f"{distinct.numel()} steps", UserWarning, stacklevel=2)
    return append_zero(timestep_sigmas.to(torch.float64)[distinct])


def rf_sigmas(num_steps: int, t_max: float = 1.0 - 1e-3, shift: float = 1.0, device=None) -> torch.Tensor:
    """Rectified-flow grid uniform in t (Liu et al. 2023): ``t_i = t_max (1 - i/N)`` for i <= N, mapped to
    ``sigma = shift * t / (1 - t)`` (docs/formulations.md#rf, convention A: t=0 data). The last entry is 0.
    Returns ``[num_steps + 1]`` float64."""
    _check_steps(num_steps)
    t = torch.linspace(t_max, 0.0, num_steps + 1, dtype=torch.float64, device=device)
    return shift * t / (1 - t)

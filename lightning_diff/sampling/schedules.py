"""Sigma grids for sampling.

Every function returns a decreasing 1-D float64 tensor of noise levels that ends in 0 (the
k-diffusion / EDM convention: ``num_steps`` steps need ``num_steps + 1`` entries). Grids are built
in float64 so that the step sizes of a 1000-step schedule are not rounded away.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "append_zero",
    "karras_sigmas",
    "vp_sigmas",
    "ve_sigmas",
    "loglinear_sigmas",
    "iddpm_sigmas",
    "ddpm_timesteps",
    "rf_sigmas",
    "SPACINGS",
]

SPACINGS = ("linear", "quadratic", "leading", "trailing", "linspace")


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
    """The decreasing 0-based timestep indices a strided DDPM/DDIM sampler visits.

    - ``linear``: DDIM's ``tau_i = floor(c i)`` with ``c = T // N`` (Song et al. 2021, App. D.2);
      the same as diffusers' ``leading``.
    - ``quadratic``: DDIM's ``tau_i = floor(c i^2)``, ``c`` so that the largest is ``0.8 T``
      (the DDIM code's CIFAR-10 choice).
    - ``leading`` (= linear), ``trailing`` (``round(T - i T/N) - 1``), ``linspace``
      (``round(linspace(0, T-1, N))``), as in diffusers (Lin et al. 2024, Table 2).

    Returns a long tensor ``[num_steps]``, largest index first.
    """
    _check_steps(num_steps)
    if num_steps > num_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the formulation's {num_timesteps} timesteps")
    if spacing in ("linear", "leading"):
        idx = torch.arange(num_steps, dtype=torch.long) * (num_timesteps // num_steps)
    elif spacing == "quadratic":
        idx = (torch.linspace(0, math.sqrt(num_timesteps * 0.8), num_steps, dtype=torch.float64) ** 2).long()
    elif spacing == "trailing":
        ramp = torch.arange(num_timesteps, 0, -num_timesteps / num_steps, dtype=torch.float64)
        idx = torch.round(ramp).long() - 1
        idx = idx.flip(0)
    elif spacing == "linspace":
        idx = torch.round(torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64)).long()
    else:
        raise ValueError(f"spacing={spacing!r} is not known; allowed: {', '.join(SPACINGS)}")
    if torch.unique(idx).numel() != num_steps:
        raise ValueError(f"spacing={spacing!r} with num_steps={num_steps} of {num_timesteps} "
                         "repeats a timestep")
    return idx.flip(0)


def rf_sigmas(num_steps: int, t_max: float = 1.0 - 1e-3, shift: float = 1.0, device=None) -> torch.Tensor:
    """Rectified-flow grid uniform in t (Liu et al. 2023): ``t_i = t_max (1 - i/N)`` for i <= N, mapped to
    ``sigma = shift * t / (1 - t)`` (MATH.md §6.8, convention A: t=0 data). The last entry is 0.
    Returns ``[num_steps + 1]`` float64."""
    _check_steps(num_steps)
    t = torch.linspace(t_max, 0.0, num_steps + 1, dtype=torch.float64, device=device)
    return shift * t / (1 - t)

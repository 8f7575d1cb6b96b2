"""Discrete-time families: the network knows a finite, decreasing grid of noise levels.

- ``ddpm``: Ho et al. 2020 (T=1000, linear betas 1e-4..0.02), the cosine schedule of Nichol &
  Dhariwal 2021 or explicit betas; epsilon-, x0- or v-prediction, ``c_noise`` the 0-based timestep index of
  Ho et al.'s code (times ``timestep_scale``).
- ``iddpm``: EDM Table 1's "iDDPM" column (the u_j grid, C1, C2, j0; NVlabs/edm ``iDDPMPrecond``).
- ``ncsn``: Song & Ermon 2019 / NCSNv2 (L geometric noise levels, ``s = F / sigma``).

Time is the noise level itself (``sigma(t) = t``, EDM's choice for iDDPM). ``ddpm`` keeps its
variance-preserving scaling ``s = sqrt(alpha_bar) = 1/sqrt(1 + sigma^2)`` so that its SDE view and
EDM Algorithm 1 in its own frame are the DDPM forward process; ``iddpm`` and ``ncsn`` use s = 1.
"""

from __future__ import annotations

import math

import torch

from ..aliases import renamed_keywords
from .base import Formulation, check_positive, check_range
from .prediction import VPPrediction, check_prediction
from .schedules import SPACINGS, ddpm_sigmas, iddpm_sigmas

BETA_SCHEDULES = ("linear", "cosine")


class DiscreteFormulation(Formulation):
    """A formulation whose network was trained on ``grid`` (decreasing float64 ``[K]``, no zero).

    ``c_noise`` of grid level k is ``self._index_to_c_noise(k)``; training draws k uniformly.
    """

    discrete = True
    grid: torch.Tensor

    def nearest_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index (long, shaped like ``sigma``) of the grid level nearest to each ``sigma``."""
        grid = self.grid.to(device=sigma.device, dtype=torch.float64)
        return (sigma.to(torch.float64).reshape(-1, 1) - grid).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma):
        """Nearest grid level (EDM ``round_sigma``); 0 stays 0 so that grids can end in 0."""
        snapped = self.grid.to(device=sigma.device, dtype=sigma.dtype)[self.nearest_index(sigma)]
        return torch.where(sigma == 0, sigma, snapped)

    def c_out(self, sigma):
        return -sigma

    def sample_training_sigma(self, shape, generator=None, device=None):
        k = torch.randint(0, self.grid.numel(), shape, generator=generator, device=device)
        return self.grid.to(device=k.device)[k].float()


class DDPM(VPPrediction, DiscreteFormulation):
    """Ho et al. 2020. sigma_i = sqrt((1 - abar_i) / abar_i) for timestep index i = 0..T-1.

    The network's target (``prediction``), in the DDPM frame ``x_t = sqrt(abar) y + sqrt(1 - abar) eps``
    and in our sigma-frame ``x = x_t / sqrt(abar) = y + sigma eps`` (so ``sqrt(abar) = 1/sqrt(1 + sigma^2)``):

    ``eps``, ``x0`` or ``v`` with c_skip, c_out and ``loss_weight = 1 / c_out^2`` from ``prediction.VPPrediction``
    (eps: ``D = x - sigma F``; x0: ``D = F``; v, Salimans & Ho 2022 Sec. 4:
    ``D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) F``).
    """

    name = "ddpm"

    def __init__(
        self,
        num_timesteps: int = 1000,  # T; must equal len(betas) when betas are given.
        beta_schedule: str = "linear",  # 'linear' (Ho et al.) or 'cosine' (Nichol & Dhariwal 2021).
        beta_start: float = 1e-4,  # First beta of the linear schedule (scaled by 1000/T, as iDDPM does).
        beta_end: float = 0.02,  # Last beta of the linear schedule (scaled by 1000/T).
        cosine_s: float = 0.008,  # Offset s of the cosine schedule (Nichol & Dhariwal eq. 17).
        max_beta: float = 0.999,  # Clip of the cosine schedule's betas.
        spacing: str = "trailing",  # Sampling sub-sequence (schedules.SPACINGS); trailing: Lin et al. 2024.
        betas=None,  # Explicit T betas (a checkpoint's own, diffusers' trained_betas); replace the schedule.
        prediction: str = "eps",  # The network's target: 'eps', 'x0' or 'v' (see the class docstring).
        timestep_scale: float = 1.0,  # c_noise = timestep index * timestep_scale (iDDPM rescale_timesteps: 1000/T).
    ):
        setting = f"formulation={self.name}"
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"{setting}: num_timesteps={num_timesteps!r} is invalid; allowed: an integer >= 2")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"{setting}: beta_schedule={beta_schedule!r} is not known; allowed: {BETA_SCHEDULES}")
        check_prediction(prediction, setting)
        if spacing not in SPACINGS:
            raise ValueError(f"{setting}: spacing={spacing!r} is not known; allowed: {', '.join(SPACINGS)}")
        check_range(beta_start, beta_end, setting + " (betas)")
        check_positive("cosine_s", cosine_s, setting)
        check_positive("timestep_scale", timestep_scale, setting)
        self.num_timesteps, self.beta_schedule = num_timesteps, beta_schedule
        self.beta_start, self.beta_end, self.cosine_s, self.max_beta = beta_start, beta_end, cosine_s, max_beta
        self.spacing, self.prediction, self.timestep_scale = spacing, prediction, timestep_scale
        self._explicit_betas = betas is not None
        self.betas = self._make_betas() if betas is None else _checked_betas(betas, num_timesteps, setting)
        if float(self.betas.max()) >= 1:
            raise ValueError(f"{setting}: the {beta_schedule} schedule with num_timesteps={num_timesteps} reaches "
                             f"beta={float(self.betas.max()):.4g} (linear betas are scaled by 1000/T); allowed: all "
                             "betas < 1 (more timesteps or a smaller beta_end)")
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # abar_i, i = 0..T-1
        self.grid = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().flip(0)  # decreasing
        self.sigma_min, self.sigma_max = float(self.grid[-1]), float(self.grid[0])

    def _make_betas(self) -> torch.Tensor:
        T = self.num_timesteps
        if self.beta_schedule == "linear":
            scale = 1000 / T
            return torch.linspace(scale * self.beta_start, scale * self.beta_end, T, dtype=torch.float64)
        # Cosine (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=self.max_beta)

    def config(self) -> dict:
        """The constants; ``betas`` as a list only when they were given explicitly (else the schedule's)."""
        config = {k: v for k, v in super().config().items() if not isinstance(v, torch.Tensor)}
        if self._explicit_betas:
            config["betas"] = self.betas.tolist()
        return config

    def timestep_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """0-based DDPM timestep index i of the grid level nearest to sigma (long tensor)."""
        return self.num_timesteps - 1 - self.nearest_index(sigma)

    # Variance-preserving scaling in sigma-time: s = sqrt(abar) = 1 / sqrt(1 + sigma^2).
    def s(self, t):
        return (1 + t**2).rsqrt()

    def s_deriv(self, t):
        return -t * (1 + t**2) ** -1.5

    def c_in(self, sigma):
        return (1 + sigma**2).rsqrt()

    def c_noise(self, sigma):
        return self.timestep_index(sigma).to(sigma.dtype) * self.timestep_scale

    @property
    def max_sampling_steps(self) -> int:
        """A strided grid visits each of the T timesteps at most once."""
        return self.num_timesteps

    def sampling_sigmas(self, num_steps, device=None, spacing: str | None = None):
        """Strided DDPM/DDIM grid: the distinct timesteps of ``schedules.ddpm_timesteps`` as sigmas, then 0
        (``schedules.ddpm_sigmas``: warns when that is not ``num_steps`` steps)."""
        return ddpm_sigmas(self.grid.flip(0), num_steps, spacing or self.spacing).to(device)


def _checked_betas(betas, num_timesteps: int, setting: str) -> torch.Tensor:
    """Explicit betas as float64 ``[T]``; ``ValueError`` naming ``setting`` unless 1-D, T = num_timesteps >= 2
    long, finite and each in (0, 1)."""
    try:
        values = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{setting}: betas={betas!r:.80} is invalid ({err}); allowed: a sequence of numbers") from None
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"{setting}: betas has shape {tuple(values.shape)}; allowed: a 1-D sequence of >= 2 numbers")
    if values.numel() != num_timesteps:
        raise ValueError(f"{setting}: betas has {values.numel()} entries but num_timesteps={num_timesteps}; "
                         "allowed: num_timesteps = len(betas)")
    bad = ~(torch.isfinite(values) & (values > 0) & (values < 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{setting}: betas[{i}]={float(values[i])!r} is invalid; allowed: every beta in (0, 1)")
    return values


class IDDPM(DiscreteFormulation):
    """EDM Table 1 "iDDPM": u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1}/abar_j, C1) - 1),
    abar_j = sin^2(pi/2 j / (M (C2 + 1))); c_noise = M - 1 - argmin_j |u_j - sigma|, with M = ``num_timesteps``
    (EDM's name ``M`` is the deprecated keyword alias)."""

    name = "iddpm"
    min_sampling_steps = 2  # the grid formula (EDM Table 1) divides by N - 1

    @renamed_keywords(M="num_timesteps")
    def __init__(
        self,
        C_1: float = 0.001,  # Timestep adjustment at low noise levels.
        C_2: float = 0.008,  # Timestep adjustment at high noise levels.
        num_timesteps: int = 1000,  # M: original number of timesteps in the DDPM formulation.
        j0: int = 8,  # First grid index used for sampling (u_8 = 80.20, so sigma_max ~ 80).
    ):
        setting = f"formulation={self.name}"
        check_positive("C_1", C_1, setting)
        check_positive("C_2", C_2, setting)
        M = num_timesteps
        if not isinstance(M, int) or M < 2:
            raise ValueError(f"{setting}: num_timesteps={M!r} is invalid; allowed: an integer >= 2")
        if not isinstance(j0, int) or not 0 <= j0 < M - 1:
            raise ValueError(f"{setting}: j0={j0!r} is invalid; allowed: an integer in [0, {M - 2}]")
        self.C_1, self.C_2, self.num_timesteps, self.j0 = C_1, C_2, M, j0
        u = torch.zeros(M + 1, dtype=torch.float64)
        j = torch.arange(M + 1, dtype=torch.float64)
        alpha_bar = torch.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
        for k in range(M, 0, -1):
            u[k - 1] = ((u[k] ** 2 + 1) / (alpha_bar[k - 1] / alpha_bar[k]).clamp(min=C_1) - 1).sqrt()
        self.u = u  # [M + 1], u[M] = 0
        self.grid = u[:M]
        self.sigma_min, self.sigma_max = float(u[M - 1]), float(u[0])

    def config(self) -> dict:
        return {k: v for k, v in super().config().items() if not isinstance(v, torch.Tensor)}

    def c_in(self, sigma):
        return (1 + sigma**2).rsqrt()

    def c_noise(self, sigma):
        return (self.num_timesteps - 1 - self.nearest_index(sigma)).to(sigma.dtype)

    @property
    def max_sampling_steps(self) -> int:
        """The levels u_j0 .. u_(M-1), each visited at most once."""
        return self.num_timesteps - self.j0

    def sampling_sigmas(self, num_steps, device=None):
        return iddpm_sigmas(num_steps, self.u, self.j0).to(device)


class NCSN(DiscreteFormulation):
    """Song & Ermon 2019 / NCSNv2 (Song & Ermon 2020): geometric levels sigma_1 > ... > sigma_L,
    score s = F / sigma, so D = x + sigma F (c_out = sigma); c_noise is the level index (0 = sigma_1). The L levels
    are ``num_timesteps`` (``num_levels`` is the deprecated keyword alias)."""

    name = "ncsn"

    @renamed_keywords(num_levels="num_timesteps")
    def __init__(
        self,
        sigma_max: float = 1.0,  # sigma_1 (NCSN; NCSNv2 uses about the largest pairwise data distance).
        sigma_min: float = 0.01,  # sigma_L.
        num_timesteps: int = 10,  # L: the number of noise levels.
    ):
        setting = f"formulation={self.name}"
        check_range(sigma_min, sigma_max, setting)
        L = num_timesteps
        if not isinstance(L, int) or L < 2:
            raise ValueError(f"{setting}: num_timesteps={L!r} is invalid; allowed: an integer >= 2")
        self.sigma_min, self.sigma_max, self.num_timesteps = sigma_min, sigma_max, L
        self.grid = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), L, dtype=torch.float64)

    def config(self) -> dict:
        return {k: v for k, v in super().config().items() if not isinstance(v, torch.Tensor)}

    @property
    def default_sampling_steps(self) -> int:
        """All L noise levels (annealed Langevin visits each once)."""
        return self.num_timesteps

    @property
    def max_sampling_steps(self) -> int:
        """Each of the L levels at most once."""
        return self.num_timesteps

    def c_out(self, sigma):
        return sigma

    def c_noise(self, sigma):
        return self.nearest_index(sigma).to(sigma.dtype)

    def sampling_sigmas(self, num_steps=None, device=None):
        """The noise levels (all L by default, or ``num_steps`` of them evenly by index), then 0."""
        num_steps = self.num_timesteps if num_steps is None else num_steps
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"formulation=ncsn: num_steps={num_steps!r} is invalid; "
                             f"allowed: an integer in [1, {self.num_timesteps}]")
        idx = torch.round(torch.linspace(0, self.num_timesteps - 1, num_steps, dtype=torch.float64)).long()
        sigmas = self.grid[idx]
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)

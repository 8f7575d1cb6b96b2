"""The ``Formulation`` interface: one diffusion or flow model family seen as data.

A formulation is EDM's four choices (Karras et al. 2022, Table 1; docs/formulations.md#the-edm-view):

1. schedule: noise level ``sigma(t)`` and scaling ``s(t)``, their derivatives and the inverse
   ``t_of_sigma``, so that ``x_t = s(t) (y + sigma(t) n)``;
2. preconditioning ``c_skip, c_out, c_in, c_noise`` of one network ``F``:
   ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` (EDM eq. 7);
3. the training distribution of ``sigma`` and the loss weight ``lambda(sigma)``;
4. a default sampling grid ``sampling_sigmas``.

All methods take tensors of any float dtype and return the same dtype (float64 stays float64);
noise levels are in the sigma-frame (``x / s(t)``, the "VE frame") and are dimensionless, in units
of the data (images scaled to [-1, 1]).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Formulation", "check_positive", "check_range"]


def check_positive(name: str, value: float, setting: str) -> None:
    """Raise ``ValueError`` naming ``setting`` unless ``value`` is a finite number > 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{setting}: {name}={value!r} is invalid; allowed: a finite number > 0")


def check_range(sigma_min: float, sigma_max: float, setting: str) -> None:
    """Raise ``ValueError`` unless ``0 < sigma_min < sigma_max``."""
    check_positive("sigma_min", sigma_min, setting)
    check_positive("sigma_max", sigma_max, setting)
    if sigma_min >= sigma_max:
        raise ValueError(f"{setting}: sigma_min={sigma_min} must be < sigma_max={sigma_max}")


class Formulation:
    """Base class of every formulation. Subclasses override the schedule, preconditioning,
    training distribution and sampling grid; the SDE view ``f, g`` follows from the schedule.

    Attributes:
        name: registry name (``edm``, ``vp``, ...).
        sigma_min, sigma_max: the noise range the network is trained and sampled on (floats).
        discrete: True when the network only knows a finite grid of noise levels.
        default_sampling_steps: the grid length a sampler uses when none is asked for.
        min_sampling_steps, max_sampling_steps: the step counts ``sampling_sigmas`` can make (None: no limit).
    """

    name: str = "base"
    discrete: bool = False
    default_sampling_steps: int = 18  # EDM's 18 Heun steps (35 NFE), used when no step count is asked for
    min_sampling_steps: int = 1
    max_sampling_steps: int | None = None
    sigma_min: float
    sigma_max: float

    # --- schedule -------------------------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level sigma(t) in the sigma-frame."""
        return t

    def sigma_deriv(self, t: torch.Tensor) -> torch.Tensor:
        """d sigma / dt."""
        return torch.ones_like(t)

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of ``sigma(t)``."""
        return sigma

    def s(self, t: torch.Tensor) -> torch.Tensor:
        """Scaling s(t): ``x_t = s(t) * (y + sigma(t) n)``."""
        return torch.ones_like(t)

    def s_deriv(self, t: torch.Tensor) -> torch.Tensor:
        """d s / dt."""
        return torch.zeros_like(t)

    # --- SDE view (Song et al. 2021; docs/formulations.md#sde-view: f = s'/s, g = s sqrt(2 sigma' sigma)) ---------
    def f(self, t: torch.Tensor) -> torch.Tensor:
        """Drift coefficient of the forward SDE ``dx = f(t) x dt + g(t) dw`` (x in the x_t frame)."""
        return self.s_deriv(t) / self.s(t)

    def g(self, t: torch.Tensor) -> torch.Tensor:
        """Diffusion coefficient of the forward SDE."""
        return self.s(t) * (2 * self.sigma_deriv(t) * self.sigma(t)).sqrt()

    # --- preconditioning (EDM eq. 7) ---------------------------------------------------------------
    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------------------
    def sample_training_sigma(self, shape, generator: torch.Generator | None = None,
                              device=None) -> torch.Tensor:
        """Draw noise levels from the training distribution p(sigma); float32 tensor of ``shape``."""
        raise NotImplementedError

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) in ``lambda ||D(y + sigma n; sigma) - y||^2``. Default 1/sigma^2 (VP, VE, iDDPM,
        DDPM, NCSN: with ``|c_out| = sigma`` the effective weight ``lambda c_out^2`` is 1)."""
        return 1 / sigma**2

    # --- sampling -----------------------------------------------------------------------------------
    def sampling_sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        """The formulation's default grid: decreasing float64 ``[num_steps + 1]`` ending in 0."""
        raise NotImplementedError

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Snap to the noise levels the network knows (identity for continuous families)."""
        return sigma

    # --- helpers ------------------------------------------------------------------------------------
    def _uniform(self, shape, generator, device) -> torch.Tensor:
        """U[0, 1) in float64 (so that transforms near the ends stay finite)."""
        return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)

    def _normal(self, shape, generator, device) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=device)

    def config(self) -> dict:
        """The constants that define this formulation (for logging next to results)."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

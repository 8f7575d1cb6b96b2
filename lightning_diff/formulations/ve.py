"""Variance-exploding SDE (Song et al. 2021; EDM Table 1 "VE" column, NVlabs/edm ``VEPrecond``/``VELoss``).

EDM uses sigma_min=0.02, sigma_max=100 (the defaults); score_sde's CIFAR-10 configs use 0.01/50
(``formulation.sigma_min=0.01 formulation.sigma_max=50``)."""

from __future__ import annotations

import math

from .base import Formulation, check_range
from .schedules import ve_sigmas


class VE(Formulation):
    """sigma(t) = sqrt(t), s(t) = 1; ``D = x + sigma F`` with F fed ``ln(sigma / 2)``."""

    name = "ve"

    def __init__(
        self,
        sigma_min: float = 0.02,  # Minimum noise level (EDM; score_sde CIFAR-10: 0.01).
        sigma_max: float = 100.0,  # Maximum noise level (EDM; score_sde CIFAR-10: 50).
    ):
        check_range(sigma_min, sigma_max, f"formulation={self.name}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        return t.sqrt()

    def sigma_deriv(self, t):
        return 0.5 / t.sqrt()

    def t_of_sigma(self, sigma):
        return sigma**2

    def c_out(self, sigma):
        return sigma

    def c_noise(self, sigma):
        return (0.5 * sigma).log()

    def sample_training_sigma(self, shape, generator=None, device=None):
        # ln(sigma) ~ U(ln sigma_min, ln sigma_max) (EDM Table 1).
        u = self._uniform(shape, generator, device)
        return (math.log(self.sigma_min) + u * math.log(self.sigma_max / self.sigma_min)).exp().float()

    def sampling_sigmas(self, num_steps, device=None):
        return ve_sigmas(num_steps, self.sigma_min, self.sigma_max, device=device)

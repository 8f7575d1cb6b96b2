"""EDM (Karras et al. 2022, Table 1 "EDM" column; NVlabs/edm ``EDMPrecond``/``EDMLoss``)."""

from __future__ import annotations

from .base import Formulation, check_positive, check_range
from .schedules import karras_sigmas


class EDM(Formulation):
    """sigma(t) = t, s(t) = 1; preconditioning that keeps network inputs and targets at unit variance."""

    name = "edm"

    def __init__(
        self,
        sigma_data: float = 0.5,  # Standard deviation of the data (images in [-1, 1]).
        P_mean: float = -1.2,  # Mean of ln(sigma) during training.
        P_std: float = 1.2,  # Standard deviation of ln(sigma) during training.
        sigma_min: float = 0.002,  # Lowest noise level used for sampling.
        sigma_max: float = 80.0,  # Highest noise level used for sampling.
        rho: float = 7.0,  # Time-step exponent of the sampling grid (EDM eq. 5).
    ):
        setting = f"formulation={self.name}"  # edm, or a subclass's (consistency)
        check_positive("sigma_data", sigma_data, setting)
        check_positive("P_std", P_std, setting)
        check_positive("rho", rho, setting)
        check_range(sigma_min, sigma_max, setting)
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma):
        return 1 / (self.sigma_data**2 + sigma**2).sqrt()

    def c_noise(self, sigma):
        return sigma.log() / 4

    def loss_weight(self, sigma):
        # EDM eq. 8 / Table 1: lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2.
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_training_sigma(self, shape, generator=None, device=None):
        # ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1).
        return (self._normal(shape, generator, device) * self.P_std + self.P_mean).exp().float()

    def sampling_sigmas(self, num_steps, device=None):
        return karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho, device=device)

"""Rectified flow / flow matching in EDM terms (docs/formulations.md#rf, convention A: t=0 data, t=1 noise).

``x_t = (1 - t) y + t eps`` is ``s(t) = 1 - t``, ``sigma(t) = t / (1 - t)``; a network predicting the
velocity ``v = eps - y`` gives ``D = x/(1+sigma) - sigma/(1+sigma) F`` and ``||v_theta - v||^2 =
lambda ||D - y||^2`` with ``lambda = (1+sigma)^2/sigma^2 = 1/c_out^2``. Logit-normal t (Esser et al.
2024, SD3) is exactly EDM's log-normal sigma. A resolution ``shift`` alpha maps sigma -> alpha sigma in
training and sampling (diffusers: t' = alpha t / (1 + (alpha - 1) t)).
"""

from __future__ import annotations

import torch

from .base import Formulation, check_positive
from .schedules import rf_sigmas

T_DISTRIBUTIONS = ("uniform", "logit_normal")


class RectifiedFlow(Formulation):
    name = "rf"

    def __init__(
        self,
        t_distribution: str = "uniform",  # Training t: 'uniform' (Liu et al. 2023) or 'logit_normal' (SD3).
        logit_mean: float = 0.0,  # Mean of logit(t) for 'logit_normal' (SD3: 0).
        logit_std: float = 1.0,  # Std of logit(t) for 'logit_normal' (SD3: 1).
        shift: float = 1.0,  # Resolution shift alpha: sigma -> alpha sigma (SD3: 3 at 1024px).
        t_min: float = 1e-4,  # Smallest t of the noise range (sigma_min = shift t_min / (1 - t_min)).
        t_max: float = 1 - 1e-3,  # Largest t of the sampling grid (t = 1 is sigma = infinity).
        t_scale: float = 999.0,  # c_noise = t_scale * t (Liu et al.'s code feeds 999 t).
    ):
        setting = f"formulation={self.name}"
        if t_distribution not in T_DISTRIBUTIONS:
            raise ValueError(f"{setting}: t_distribution={t_distribution!r} is not known; "
                             f"allowed: {T_DISTRIBUTIONS}")
        check_positive("logit_std", logit_std, setting)
        check_positive("shift", shift, setting)
        check_positive("t_scale", t_scale, setting)
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"{setting}: need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.t_distribution, self.logit_mean, self.logit_std = t_distribution, logit_mean, logit_std
        self.shift, self.t_min, self.t_max, self.t_scale = shift, t_min, t_max, t_scale
        self.sigma_min = float(self.sigma(torch.tensor(t_min, dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor(t_max, dtype=torch.float64)))

    # The schedule in the flow's own time t (with the shift folded in: x_t = s(t)(y + sigma(t) n)).
    def sigma(self, t):
        return self.shift * t / (1 - t)

    def sigma_deriv(self, t):
        return self.shift / (1 - t) ** 2

    def t_of_sigma(self, sigma):
        return sigma / (self.shift + sigma)

    def s(self, t):
        # s = 1 / (1 + sigma(t)), the scaling that keeps x_t = (1 - t') y + t' eps with t' = sigma/(1+sigma).
        return 1 / (1 + self.sigma(t))

    def s_deriv(self, t):
        return -self.sigma_deriv(t) * self.s(t) ** 2

    def c_skip(self, sigma):
        return 1 / (1 + sigma)

    def c_out(self, sigma):
        return -sigma / (1 + sigma)

    def c_in(self, sigma):
        return 1 / (1 + sigma)

    def c_noise(self, sigma):
        # The interpolation time t' = sigma / (1 + sigma) of x_t' = (1 - t') y + t' eps, scaled.
        return self.t_scale * sigma / (1 + sigma)

    def loss_weight(self, sigma):
        return (1 + sigma) ** 2 / sigma**2

    def sample_training_sigma(self, shape, generator=None, device=None):
        if self.t_distribution == "uniform":
            t = self._uniform(shape, generator, device)
            return self.sigma(t).float()
        # logit(t) ~ N(m, s^2)  <=>  ln(sigma / shift) ~ N(m, s^2) (docs/formulations.md#rf).
        return (self.shift * (self._normal(shape, generator, device) * self.logit_std + self.logit_mean).exp()).float()

    def sampling_sigmas(self, num_steps, device=None):
        return rf_sigmas(num_steps, t_max=self.t_max, shift=self.shift, device=device)

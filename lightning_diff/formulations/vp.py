"""Variance-preserving families of Song et al. 2021: the VP-SDE (EDM Table 1 "VP" column, NVlabs/edm
``VPPrecond``/``VPLoss``) and the sub-VP SDE (score_sde ``subVPSDE``; docs/formulations.md#subvp)."""

from __future__ import annotations

import torch

from ..aliases import renamed_keywords
from .base import Formulation, check_positive
from .prediction import VPPrediction, check_prediction
from .schedules import vp_sigmas


class VP(VPPrediction, Formulation):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), s(t) = 1 / sqrt(1 + sigma(t)^2); network fed
    ``c_in x = x_t`` and ``(M - 1) t``, predicting ``eps`` (EDM's VPPrecond), ``x0`` or ``v`` (Salimans & Ho 2022,
    Sec. 4: ``v = alpha n - sigma_t y``); c_skip, c_out and ``loss_weight = 1 / c_out^2`` from
    ``prediction.VPPrediction`` (for eps the weight is EDM's 1/sigma^2). M is ``num_timesteps`` (EDM's name ``M``:
    the deprecated keyword alias)."""

    name = "vp"

    @renamed_keywords(M="num_timesteps")
    def __init__(
        self,
        beta_d: float = 19.9,  # Extent of the noise level schedule (beta_max - beta_min).
        beta_min: float = 0.1,  # Initial slope of the noise level schedule.
        num_timesteps: int = 1000,  # M: original number of timesteps in the DDPM formulation (c_noise scale).
        epsilon_t: float = 1e-5,  # Minimum t during training.
        epsilon_s: float = 1e-3,  # Minimum t of the sampling grid (EDM Table 1).
        prediction: str = "eps",  # The network's target: 'eps', 'x0' or 'v' (formulations.prediction).
    ):
        setting = f"formulation={self.name}"
        check_prediction(prediction, setting)
        if self.name == "subvp" and prediction != "eps":
            raise ValueError(f"{setting}: prediction={prediction!r} is not supported; allowed: eps (x0 and v are "
                             "defined for the variance-preserving frame, formulation=vp)")
        self.prediction = prediction
        positive = dict(beta_d=beta_d, num_timesteps=num_timesteps, epsilon_t=epsilon_t, epsilon_s=epsilon_s)
        for key, value in positive.items():
            check_positive(key, value, setting)
        if beta_min < 0:
            raise ValueError(f"{setting}: beta_min={beta_min} is invalid; allowed: a number >= 0")
        for key, value in dict(epsilon_t=epsilon_t, epsilon_s=epsilon_s).items():
            if value >= 1:
                raise ValueError(f"{setting}: {key}={value} is invalid; allowed: 0 < {key} < 1")
        self.beta_d, self.beta_min, self.num_timesteps = beta_d, beta_min, num_timesteps
        self.epsilon_t, self.epsilon_s = epsilon_t, epsilon_s
        t = torch.tensor([epsilon_t, 1.0], dtype=torch.float64)
        self.sigma_min, self.sigma_max = (float(v) for v in self.sigma(t))

    # int_0^t beta(u) du and beta(t) for the linear beta(t) = beta_min + beta_d t.
    def _B(self, t):
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def _beta(self, t):
        return self.beta_min + self.beta_d * t

    def _t_of_B(self, B):
        return ((self.beta_min**2 + 2 * self.beta_d * B).sqrt() - self.beta_min) / self.beta_d

    def sigma(self, t):
        return torch.expm1(self._B(t)).sqrt()

    def sigma_deriv(self, t):
        return self._beta(t) * self._B(t).exp() / (2 * self.sigma(t))

    def t_of_sigma(self, sigma):
        # EDM Table 1 footnote: sigma^-1(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d.
        # ln(1 + sigma^2) as NVlabs/edm's VPPrecond computes it, not log1p: in float32 the network input c_noise then
        # equals the one EDM's VP nets were trained on (log1p's is 1% away at sigma = 0.002).
        return self._t_of_B(torch.log(1 + sigma**2))

    def s(self, t):
        return (-0.5 * self._B(t)).exp()

    def s_deriv(self, t):
        return -0.5 * self._beta(t) * self.s(t)

    def c_in(self, sigma):
        return self.s(self.t_of_sigma(sigma))

    def c_noise(self, sigma):
        return (self.num_timesteps - 1) * self.t_of_sigma(sigma)

    def sample_training_sigma(self, shape, generator=None, device=None):
        # t ~ U(epsilon_t, 1) (EDM Table 1, Song et al. 2021).
        t = 1 + self._uniform(shape, generator, device) * (self.epsilon_t - 1)
        return self.sigma(t).float()

    def sampling_sigmas(self, num_steps, device=None):
        return vp_sigmas(num_steps, self.sigma, self.epsilon_s, device=device)


class SubVP(VP):
    """sub-VP SDE (Song et al. 2021, eq. 29): x_t = sqrt(abar) y + (1 - abar) n with abar = exp(-B(t)),
    so s = exp(-B/2), sigma = (1 - abar)/sqrt(abar) = 2 sinh(B/2); g^2 = beta (1 - exp(-2B))."""

    name = "subvp"

    def sigma(self, t):
        return 2 * torch.sinh(0.5 * self._B(t))

    def sigma_deriv(self, t):
        return self._beta(t) * torch.cosh(0.5 * self._B(t))

    def t_of_sigma(self, sigma):
        return self._t_of_B(2 * torch.asinh(0.5 * sigma))

"""The DDPM posterior ``q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta~_t I)`` (Ho et al. 2020, eq. 6-7),
one function for every module that needs it: the ``ddpm`` sampler, Analytic-DPM, the VLB and the hybrid objective;
with the Gaussian KL and the discretized decoder likelihood that the VLB's terms are made of (Ho et al. 2020 eq. 5, 13;
Nichol & Dhariwal 2021 eq. 4 - 7)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["DDPMPosterior", "ddpm_posterior", "posterior_chain", "normal_kl", "discretized_gaussian_log_likelihood"]

Number = float | torch.Tensor


class DDPMPosterior(NamedTuple):
    """The step ``t -> t-1`` of a DDPM chain, each a float or a tensor shaped like the inputs."""

    beta: Number  # beta_t = 1 - abar_t / abar_{t-1} (re-derived on a strided chain, as iDDPM's respacing)
    variance: Number  # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Ho et al. eq. 7)
    coef_x0: Number  # sqrt(abar_{t-1}) beta_t / (1 - abar_t), the weight of x_0 in mu~_t (eq. 7)
    coef_xt: Number  # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t), the weight of x_t in mu~_t (eq. 7)


def ddpm_posterior(abar: Number, abar_prev: Number) -> DDPMPosterior:
    """The posterior of the step between cumulative products ``abar = abar_t`` and ``abar_prev = abar_{t-1}``
    (1 at t = 0, or on a step to sigma = 0 in the sigma-frame, ``abar = 1 / (1 + sigma^2)``); floats or tensors of
    one shape (float64 recommended). Ho et al. 2020 eq. 6-7 with ``alpha_t = abar_t / abar_{t-1}``."""
    beta = 1 - abar / abar_prev
    return DDPMPosterior(
        beta=beta,
        variance=(1 - abar_prev) / (1 - abar) * beta,
        coef_x0=abar_prev**0.5 * beta / (1 - abar),
        coef_xt=(1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar),
    )


def posterior_chain(abar: torch.Tensor) -> tuple[torch.Tensor, DDPMPosterior]:
    """The posterior ``q(x_{t-1} | x_t, x_0)`` of every step of the chain with cumulative products ``abar [K]``
    (increasing t, float64; abar_{-1} = 1, so a strided chain's betas are re-derived), Ho et al. 2020 eq. 6-7
    (``ddpm_posterior``). Returns ``(logvar, posterior)``, each entry ``[K]``:
    ``logvar = log beta~_t`` clipped at t = 0 to ``log beta~_1`` (beta~_0 = 0; iDDPM's
    ``posterior_log_variance_clipped``, also the lower end of its learned range, eq. 15)."""
    posterior = ddpm_posterior(abar, torch.cat([abar.new_ones(1), abar[:-1]]))
    logvar = torch.log(torch.cat([posterior.variance[1:2], posterior.variance[1:]]))
    return logvar, posterior


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x0, mean, log_scale, *, half_width: float, low: float, high: float
) -> torch.Tensor:
    """log P(bin of x0) under N(mean, e^{2 log_scale}), bins ``x0 +- half_width``, the edge bins extended
    to -inf / +inf (Ho et al. 2020 eq. 13), elementwise, nats."""
    normal = torch.distributions.Normal(mean, torch.exp(log_scale))
    cdf_hi = torch.where(x0 > high - half_width, torch.ones_like(x0), normal.cdf(x0 + half_width))
    cdf_lo = torch.where(x0 < low + half_width, torch.zeros_like(x0), normal.cdf(x0 - half_width))
    # Far in a tail the difference of CDFs underflows: use log-density * width there.
    log_mass = torch.log((cdf_hi - cdf_lo).clamp(min=1e-300))
    return torch.where(cdf_hi - cdf_lo > 1e-12, log_mass, normal.log_prob(x0) + math.log(2 * half_width))

"""The DDPM posterior ``q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta~_t I)`` (Ho et al. 2020, eq. 6-7),
one function for every module that needs it: the ``ddpm`` sampler, Analytic-DPM, the VLB and the hybrid objective."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DDPMPosterior", "ddpm_posterior"]

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

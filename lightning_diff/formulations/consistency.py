"""Consistency models' parametrisation (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", eq. 7 and
Appendix C; docs/consistency.md): EDM's preconditioning with ``c_skip`` and ``c_out`` shifted by ``sigma_min`` so that
the boundary condition ``f(x, sigma_min) = x`` holds exactly, ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0``.
"""

from __future__ import annotations

import torch

from .edm import EDM
from .schedules import append_zero, karras_sigmas


class Consistency(EDM):
    """``formulation=consistency``: a consistency function ``f(x, sigma) = c_skip x + c_out F(c_in x; c_noise)`` on
    ``[sigma_min, sigma_max]`` (Song et al. 2023, eq. 7). ``c_in``, ``c_noise``, the training density and the loss
    weight are EDM's (the same network F as an EDM denoiser, so a teacher's weights initialise it); only
    ``c_skip``, ``c_out`` and the sampling grid differ. Below ``sigma_min`` the function is not defined by the paper
    (``c_out`` changes sign): consistency training and sampling never go there."""

    name = "consistency"
    default_sampling_steps = 1  # one-step generation, the point of a consistency model (Song et al. 2023, Alg. 1)

    def c_skip(self, sigma):
        # Song et al. 2023, Appendix C: c_skip(t) = sigma_data^2 / ((t - eps)^2 + sigma_data^2), eps = sigma_min
        return self.sigma_data**2 / ((sigma - self.sigma_min) ** 2 + self.sigma_data**2)

    def c_out(self, sigma):
        # Song et al. 2023, Appendix C: c_out(t) = sigma_data (t - eps) / sqrt(sigma_data^2 + t^2)
        return self.sigma_data * (sigma - self.sigma_min) / (self.sigma_data**2 + sigma**2).sqrt()

    def sampling_sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        """``num_steps`` levels for ``num_steps`` network evaluations of Algorithm 1 (``sampler=consistency``):
        EDM's time steps (eq. 5) with ``num_steps + 1`` levels from ``sigma_max`` to ``sigma_min``, without the last
        one (where f is the identity), then 0. One step is ``[sigma_max, 0]``. Float64 ``[num_steps + 1]``."""
        levels = karras_sigmas(num_steps + 1, self.sigma_min, self.sigma_max, self.rho, device=device)
        return append_zero(levels[:num_steps])

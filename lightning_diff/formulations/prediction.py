"""What the network predicts in a variance-preserving family (``ddpm``, ``vp``): ``eps``, ``x0`` or ``v``.

In the VP frame ``x_t = alpha y + sigma_t n`` with ``alpha = sqrt(abar) = 1 / sqrt(1 + sigma^2)`` and
``sigma_t = sqrt(1 - abar) = sigma / sqrt(1 + sigma^2)``, i.e. our sigma-frame ``x = x_t / alpha = y + sigma n``:

- ``eps`` (Ho et al. 2020, eq. 11): ``F = n``, ``D = x - sigma F``; c_skip 1, c_out -sigma.
- ``x0`` (guided-diffusion ``predict_xstart``, diffusers ``"sample"``): ``F = y``; c_skip 0, c_out 1.
- ``v`` (Salimans & Ho 2022, Sec. 4 and Appendix D: ``v = alpha n - sigma_t y``, diffusers ``"v_prediction"``):
  ``y = alpha x_t - sigma_t v``, i.e. ``D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) F``;
  c_skip ``alpha^2``, c_out ``-sigma_t``.

``loss_weight = 1 / c_out^2`` makes ``lambda ||D - y||^2`` the MSE on the network's own target: 1/sigma^2 for eps,
1 for x0, (1 + sigma^2)/sigma^2 = 1/sigma_t^2 for v (docs/formulations.md#ddpm).
"""

from __future__ import annotations

import torch

__all__ = ["PREDICTIONS", "VPPrediction", "check_prediction"]

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str, setting: str) -> None:
    """Raise ``ValueError`` naming ``setting`` unless ``prediction`` is one of ``PREDICTIONS``."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"{setting}: prediction={prediction!r} is not known; allowed: {PREDICTIONS}")


class VPPrediction:
    """Mixin (listed before the ``Formulation`` base): ``c_skip``, ``c_out`` and ``loss_weight`` of
    ``self.prediction`` in the VP frame (module docstring). Sigma-frame tensors of any float dtype in and out."""

    prediction: str = "eps"

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return torch.ones_like(sigma)
        if self.prediction == "x0":
            return torch.zeros_like(sigma)
        return 1 / (1 + sigma**2)  # v: alpha^2 (Salimans & Ho 2022, Sec. 4)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return -sigma
        if self.prediction == "x0":
            return torch.ones_like(sigma)
        return -sigma * (1 + sigma**2).rsqrt()  # v: -sigma_t

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """1 / c_out^2: the MSE on the network's own target (eps: 1/sigma^2, x0: 1, v: (1 + sigma^2)/sigma^2)."""
        return 1 / self.c_out(sigma) ** 2

"""``sn_dpm`` / ``npr_dpm``: the second-moment heads of Extended-Analytic-DPM (Bao, Li, Cao, Zhu & Zhang, ICML 2022),
trained beside the denoising loss; the variance they give is ``sampling.analytic_dpm.step_variance``."""

from __future__ import annotations

import torch

from ..denoiser import Denoiser, training_draw
from ..sampling.analytic_dpm import check_kind, denoise_with_head
from .base import Objective

__all__ = ["SecondMoment"]


class SecondMoment(Objective):
    """``sn_dpm`` / ``npr_dpm``: the denoising loss of the first C channels (``Denoiser.loss``) plus the regression of
    the extra C channels on the second moment of Bao et al. (ICML 2022, their SN-DPM and NPR-DPM objectives):

        lambda(sigma) ||D - y||^2 / N  +  head_weight ||head(x) - T||^2 / N,
        T = eps^2 (sn)   or   (eps - sg(eps_hat(x)))^2 (npr),   x = y + sigma eps,

    one network pass, sigma from the formulation's p(sigma). The head's minimiser is ``E[T | x]``, the conditional
    moment ``step_variance`` reads. The network needs ``2 C`` output channels.

    Args:
        kind: ``sn`` or ``npr``.
        head_weight: weight of the head's regression (the two parts share no output channel; it sets their balance
            in the shared layers).
    """

    def __init__(self, kind: str = "npr", head_weight: float = 1.0):  # Bao et al. fit the head alone: any weight > 0
        super().__init__()
        check_kind(kind, "objective.kind")
        if not isinstance(head_weight, (int, float)) or not head_weight > 0:
            raise ValueError(f"objective.head_weight={head_weight!r} is invalid; allowed: a number > 0")
        self.kind, self.head_weight = kind, float(head_weight)
        self.name = f"{kind}_dpm"

    def forward(self, denoiser: Denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, *,
                sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        y, sigma, noise = training_draw(denoiser.formulation, y, sigma, noise, generator)
        view = (-1,) + (1,) * (y.ndim - 1)
        x = y + sigma.reshape(view) * noise
        D, head = denoise_with_head(denoiser, x, sigma, **({"labels": labels} if labels is not None else {}), **cond)
        with torch.autocast(y.device.type, enabled=False):
            mean_loss = denoiser.formulation.loss_weight(sigma) * ((D - y) ** 2).flatten(1).mean(1)
            eps_hat = ((x - D) / sigma.reshape(view)).detach()
            target = noise**2 if self.kind == "sn" else (noise - eps_hat) ** 2
            head_loss = ((head.float() - target) ** 2).flatten(1).mean(1)
            return mean_loss + self.head_weight * head_loss, sigma

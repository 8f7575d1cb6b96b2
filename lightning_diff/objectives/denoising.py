"""``dsm``: denoising score matching, the framework's one loss (``Denoiser.loss``) as an objective."""

from __future__ import annotations

import torch

from ..denoiser import Denoiser
from .base import Objective

__all__ = ["DenoisingScoreMatching"]


class DenoisingScoreMatching(Objective):
    """``dsm``: ``lambda(sigma) ||D(y + sigma n; sigma) - y||^2 / N`` (Vincent 2011, eq. 4 - 5; Song & Ermon 2019,
    eq. 2 with NCSN's annealing eq. 6; EDM eq. 2 and 8 for lambda and p(sigma)): ``Denoiser.loss`` itself, the
    framework's one loss before objectives existed (bit-identical)."""

    name = "dsm"

    def forward(self, denoiser: Denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        return denoiser.loss(y, labels, **kwargs)

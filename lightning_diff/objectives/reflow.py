"""``reflow``: the k-rectified flow objective of Liu, Gong & Liu 2023 ("Flow straight and fast", Algorithm 1) on the
couplings that ``lightning-diff reflow`` draws (``methods.reflow``)."""

from __future__ import annotations

import torch

from .base import Objective

__all__ = ["Reflow"]


class Reflow(Objective):
    """``reflow``: the k-rectified flow objective (Liu et al. 2023, Algorithm 1): ``Denoiser.loss`` with the noise
    of the batch's coupling instead of fresh noise, ``lambda(sigma) ||D(y + sigma z; sigma) - y||^2 / N``; under
    the ``rf`` formulation that is ``||(z - y) - v_theta(x_t, t)||^2 / N`` with ``x_t = (1 - t) y + t z``. Only
    sigma is drawn (the formulation's p(sigma)). Needs batches that carry ``noise`` (``data=reflow_pairs``)."""

    name = "reflow"

    def forward(self, denoiser, y: torch.Tensor, labels: torch.Tensor | None = None, *,
                noise: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if noise is None:
            raise ValueError("objective=reflow trains on fixed couplings, but the batch carries no coupled noise; "
                             "allowed: data=reflow_pairs (a pairs file of lightning-diff reflow)")
        return denoiser.loss(y, labels, noise=noise, **kwargs)

"""``Denoiser``: one network F, preconditioned by a formulation, and the one loss for all families."""

from __future__ import annotations

import torch
from torch import nn

from .formulations import Formulation
from .networks.layers import LabelEmbedding

__all__ = ["Denoiser", "training_draw", "as_batch_sigma"]


def as_batch_sigma(sigma, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Noise levels as a ``[B]`` tensor of ``dtype`` (accepts a number, ``[]``, ``[B]`` or ``[B, 1, ...]``)."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sigma.numel() == 1:
        return sigma.reshape(1).expand(batch)
    sigma = sigma.reshape(-1)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} entries for a batch of {batch}")
    return sigma


def training_draw(formulation: Formulation, y: torch.Tensor, sigma: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y float32 [B, ...], sigma [B], noise like y)`` of one training example per row: sigma from the
    formulation's training density p(sigma) and standard normal noise unless given (every objective draws so)."""
    y = y.float()
    if sigma is None:
        sigma = formulation.sample_training_sigma((y.shape[0],), generator=generator, device=y.device)
    if noise is None:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return y, as_batch_sigma(sigma, y.shape[0], y.dtype, y.device), noise


class Denoiser(nn.Module):
    """``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), labels)`` (EDM eq. 7).

    Args:
        backbone: any module ``F(x, c_noise, labels) -> Tensor`` with ``x`` ``[B, C, ...]``, ``c_noise``
            ``[B]`` and ``labels`` ``[B]`` long or None. Its output may have extra channels (a learned
            variance head): the first ``C`` channels are the prediction.
        formulation: the family that sets the preconditioning, p(sigma) and lambda(sigma).
        variance_trained: True only when the training loss fits the extra channels as iDDPM's variance
            interpolation (Nichol & Dhariwal 2021, eq. 15): ``objective=hybrid`` or ``vlb``
            (``lightning_diff.objectives``; ``DiffusionModule`` sets it from the objective). ``Denoiser.loss``
            reads the first C channels only; ``forward_with_variance`` (learned-variance sampling and VLB)
            refuses a model without it.
        float32_preconditioning: run the preconditioning and the output in float32 even for float64 inputs,
            as NVlabs/edm's preconditioners do (``x.to(torch.float32)``); set by the importer of EDM pickles so
            that our sampler reproduces EDM's images. False: float64 inputs stay float64.

    Preconditioning and the loss run in float32 (float64 when ``x`` is float64) with autocast off;
    only the backbone runs under whatever autocast the caller (Lightning's precision plugin) set.
    """

    def __init__(self, backbone: nn.Module, formulation: Formulation, variance_trained: bool = False,
                 float32_preconditioning: bool = False):
        super().__init__()
        self.backbone = backbone
        self.formulation = formulation
        self.variance_trained = variance_trained
        self.float32_preconditioning = float32_preconditioning

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Snap noise levels to those the network was trained on (the formulation's ``round_sigma``, EDM's
        ``round_sigma``): the nearest grid level for discrete families, identity for continuous ones.
        Samplers snap their grid and EDM's churned level with it (``sampling.core``)."""
        return self.formulation.round_sigma(sigma)

    @property
    def null_label(self) -> int | None:
        """The label meaning "unconditional" inside a batch, so CFG runs both passes as one batch; None without
        one. A backbone that defines ``null_label`` (a wrapper around an outside model) answers for itself;
        otherwise it is the learned null label of its ``LabelEmbedding`` (index ``num_classes``)."""
        if hasattr(self.backbone, "null_label"):
            return self.backbone.null_label
        embedding = next((m for m in self.backbone.modules() if isinstance(m, LabelEmbedding)), None)
        return None if embedding is None else embedding.null_label

    def _backbone_dtype(self, x: torch.Tensor) -> torch.dtype:
        param = next(self.backbone.parameters(), None)
        return x.dtype if param is None else param.dtype

    def precondition(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, ...]:
        """``(sigma, c_skip, c_out, c_in, c_noise)`` for ``x`` ``[B, ...]``: the first four shaped
        ``[B, 1, ...]`` to broadcast against x, ``c_noise`` ``[B]``; all in x's float dtype."""
        fm = self.formulation
        with torch.autocast(x.device.type, enabled=False):
            sigma = as_batch_sigma(sigma, x.shape[0], x.dtype, x.device)
            view = (-1,) + (1,) * (x.ndim - 1)
            coeffs = [c.reshape(view) for c in (sigma, fm.c_skip(sigma), fm.c_out(sigma), fm.c_in(sigma))]
            return (*coeffs, fm.c_noise(sigma))

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """Estimate of the clean data y from ``x = y + sigma n`` (sigma-frame).

        Args:
            x: noisy data ``[B, C, ...]`` in model space.
            sigma: noise levels, a number or ``[B]``.
            labels: class labels ``[B]`` (long) or None; ``cond`` passes extra backbone inputs.
        Returns:
            ``[B, C, ...]`` in float32 (float64 when x is float64).
        """
        return self.forward_with_extra(x, sigma, labels, cond)[0]

    def forward_with_variance(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None,
                              **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D, v)`` from one backbone call: ``D`` as ``forward``, ``v`` ``[B, C, ...]`` the extra C channels of
        a learned-variance head (iDDPM eq. 15 reads ``(v + 1) / 2`` as the interpolation between log beta~_t and
        log beta_t), same dtype as D. ValueError unless ``variance_trained`` and the backbone gives 2C channels."""
        if not self.variance_trained:
            raise ValueError("variance='learned': this model's extra output channels were never trained as a "
                             "variance (Denoiser.variance_trained=False: its loss read the first C channels "
                             "only); allowed: a model trained with objective=hybrid or vlb, or a released one "
                             "with learn_sigma")
        D, extra = self.forward_with_extra(x, sigma, labels, cond)
        if extra.shape[1] != x.shape[1]:
            raise ValueError(f"variance='learned': the backbone gives {x.shape[1] + extra.shape[1]} channels for "
                             f"{x.shape[1]}-channel data; allowed: 2 x {x.shape[1]} (prediction and variance, "
                             f"network.out_channels={2 * x.shape[1]})")
        return D, extra.to(D.dtype)

    def forward_with_extra(self, x: torch.Tensor, sigma, labels, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D, extra)``: the denoised estimate and the backbone's channels beyond the first C (maybe none)."""
        dtype = torch.float64 if x.dtype == torch.float64 and not self.float32_preconditioning else torch.float32
        x = x.to(dtype)
        _, c_skip, c_out, c_in, c_noise = self.precondition(x, sigma)
        F = self.backbone((c_in * x).to(self._backbone_dtype(x)), c_noise, labels, **cond)
        with torch.autocast(x.device.type, enabled=False):
            return c_skip * x + c_out * F[:, : x.shape[1]].to(dtype), F[:, x.shape[1]:]

    def loss(self, y: torch.Tensor, labels: torch.Tensor | None = None, *, sigma: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
             **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """The one loss of every formulation: ``lambda(sigma) ||D(y + sigma n; sigma) - y||^2``.

        Reduction: mean over the elements of each sample (k-diffusion and score_sde ``reduce_mean``;
        NVlabs/edm sums over pixels instead, a constant factor that changes the effective learning rate,
        not the optimum). The caller averages over the batch, so the training loss is the mean over all
        elements.

        Args:
            y: clean data ``[B, C, ...]``.
            sigma, noise: optional fixed ``[B]`` noise levels / ``[B, C, ...]`` standard normal noise;
                drawn from the formulation's p(sigma) and N(0, I) when omitted.
            cond: extra backbone inputs, e.g. ``augment_labels`` ``[B, augment_dim]`` of an augmented ``y``
                (EDM's non-leaky augmentation: ``D(y_aug + sigma n; sigma, augment_labels)`` vs ``y_aug``).
        Returns:
            ``(loss [B], sigma [B])`` in float32.
        """
        y, sigma, noise = training_draw(self.formulation, y, sigma, noise, generator)
        view = (-1,) + (1,) * (y.ndim - 1)
        D = self(y + sigma.reshape(view) * noise, sigma, labels, **cond)
        with torch.autocast(y.device.type, enabled=False):
            weight = self.formulation.loss_weight(sigma)
            per_sample = ((D - y) ** 2).flatten(1).mean(dim=1)
            return weight * per_sample, sigma

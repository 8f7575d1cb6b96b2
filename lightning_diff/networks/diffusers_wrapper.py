"""Thin wrappers around diffusers' models, so that a released diffusers model runs as our backbone / decoder.

diffusers is an optional dependency (extra ``pretrained``): this module imports it only inside the functions
that need it, and the wrappers are built only by ``lightning_diff.pretrained`` around a model diffusers made.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DiffusersBackbone", "VAEDecoder"]


def _label_table(model: nn.Module) -> nn.Module | None:
    """diffusers' ``LabelEmbedding`` inside ``model`` (DiT's adaLN-Zero class embedding), None without one."""
    from diffusers.models.embeddings import LabelEmbedding

    return next((m for m in model.modules() if isinstance(m, LabelEmbedding)), None)


class DiffusersBackbone(nn.Module):
    """``F(x, c_noise, labels=None) = model(x, c_noise, class_labels=labels).sample`` for a diffusers
    ``UNet2DModel`` or ``DiTTransformer2DModel``: ``x`` ``[B, C, H, W]``, ``c_noise`` ``[B]`` the timestep index
    (0..T-1, float), ``labels`` ``[B]`` long or None. Returns ``[B, out_channels, H, W]`` (a learned-variance
    model's extra channels included; ``Denoiser`` reads the first C).

    Attributes:
        num_classes: class labels the model takes (UNet2DModel ``num_class_embeds``, DiT
            ``num_embeds_ada_norm``), 0 = unconditional.
        null_label: the index that means "unconditional" (DiT trained with class dropout: ``num_classes``),
            None when the model has none (``labels=None`` is then an error for a conditional model).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = model.config
        table = _label_table(model)
        if table is not None:
            self.num_classes = int(table.num_classes)
            has_null = table.embedding_table.num_embeddings > table.num_classes
            self.null_label = self.num_classes if has_null else None
        else:
            self.num_classes = int(config.get("num_class_embeds") or 0)
            self.null_label = None
        self.augment_dim = 0

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        name = type(self.model).__name__
        if labels is not None and not self.num_classes:
            raise ValueError(f"{name}: got class labels but the model is unconditional (num_classes=0); "
                             "allowed: labels=None")
        if labels is None and self.num_classes:
            if self.null_label is None:
                raise ValueError(f"{name}: labels=None for a class-conditional model without a null label "
                                 f"(num_classes={self.num_classes}); allowed: class labels in [0, {self.num_classes})")
            labels = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        return self.model(x, c_noise, class_labels=labels).sample


class VAEDecoder(nn.Module):
    """Latents ``[B, C_latent, h, w]`` -> images ``[B, 3, 8h, 8w]`` in model space [-1, 1]:
    ``vae.decode(latents / scale).sample`` for a diffusers ``AutoencoderKL`` (DiT's ``sample.py``; latent
    diffusion, Rombach et al. 2022, Sec. 3: latents are scaled to unit variance by ``scale``)."""

    def __init__(self, vae: nn.Module, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale).sample

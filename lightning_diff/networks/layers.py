"""Layers shared by the backbones: noise-level embeddings and class conditioning."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionalEmbedding", "FourierEmbedding", "LabelEmbedding"]


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar (Vaswani et al. 2017; DDPM++ "positional").

    Frequencies ``(1/max_positions)^(k/(num_channels/2 - endpoint))``; maps ``[B]`` -> ``[B, num_channels]``.
    Works for every formulation's ``c_noise``: a 0..999 timestep, ``999 t``, ``ln(sigma)/4``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        half = num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32) / (half - (1 if endpoint else 0))
        self.register_buffer("freqs", (1 / max_positions) ** freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(-1, 1) * self.freqs.reshape(1, -1)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020; NCSN++ "fourier", scale 16)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(-1, 1) * (2 * math.pi * self.freqs.reshape(1, -1))
        return torch.cat([x.cos(), x.sin()], dim=1)


class LabelEmbedding(nn.Module):
    """Class-label embedding with a learned null label (index ``num_classes``) for classifier-free
    guidance; during training labels are replaced by the null label with probability ``dropout``
    (Ho & Salimans 2022; k-diffusion uses 0.1). ``None`` labels mean "unconditional"."""

    def __init__(self, num_classes: int, num_channels: int, dropout: float = 0.0):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"label_dropout={dropout} is invalid; allowed: 0 <= label_dropout < 1")
        self.num_classes, self.dropout = num_classes, dropout
        self.embed = nn.Embedding(num_classes + 1, num_channels)

    def forward(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        elif self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embed(labels.long())

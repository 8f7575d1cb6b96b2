"""MLP backbone for low-dimensional (2-D toy) data."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConditionEmbedding

__all__ = ["MLP"]


class MLP(nn.Module):
    """``F(x, c_noise, labels)`` for ``x`` ``[B, dim]``: residual SiLU MLP with the noise embedding
    added to every hidden layer. Output layer is zero-initialised (so D starts at c_skip x)."""

    def __init__(
        self,
        dim: int = 2,  # Data dimension.
        hidden: int = 128,  # Width of the hidden layers.
        depth: int = 3,  # Number of residual hidden blocks.
        emb_channels: int = 64,  # Width of the noise-level embedding.
        num_classes: int = 0,  # 0 = unconditional.
        label_dropout: float = 0.0,  # Probability of the null label during training (CFG).
        out_dim: int | None = None,  # Output size; None = dim (a noise-conditional classifier: its classes).
    ):
        super().__init__()
        self.num_classes = num_classes
        self.embed = ConditionEmbedding(emb_channels, hidden, num_classes, label_dropout)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, out_dim or dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, labels)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)

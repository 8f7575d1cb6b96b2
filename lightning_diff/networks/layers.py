"""Layers shared by the backbones: noise-level embeddings, class conditioning, FIR resampling."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "PositionalEmbedding", "FourierEmbedding", "LabelEmbedding", "Resample", "group_norm",
    "check_conditioning",
]


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar (Vaswani et al. 2017; DDPM++ "positional").

    Frequencies ``(1/max_positions)^(k/(num_channels/2 - endpoint))``; maps ``[B]`` -> ``[B, num_channels]``.
    Works for every formulation's ``c_noise``: a 0..999 timestep, ``999 t``, ``ln(sigma)/4``.
    ``exp_form=True`` evaluates the same frequencies as ``exp(-ln(max_positions) k/n)`` in float32, as GLIDE's,
    ADM's and DiT's code do: an ulp apart from the power form (EDM's code), which shows at c_noise ~ 1000.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True, exp_form: bool = False):
        super().__init__()
        half = num_channels // 2
        k, n = torch.arange(half, dtype=torch.float32), half - (1 if endpoint else 0)
        freqs = torch.exp(-math.log(max_positions) * k / n) if exp_form else (1 / max_positions) ** (k / n)
        self.register_buffer("freqs", freqs, persistent=False)

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
    (Ho & Salimans 2022; k-diffusion uses 0.1). ``None`` labels mean "unconditional".

    ``with_null=False`` builds a table of ``num_classes`` rows only (ADM's class-conditional models have no
    unconditional mode): ``None`` labels and label dropout are then errors, and ``null_label`` is None."""

    def __init__(self, num_classes: int, num_channels: int, dropout: float = 0.0, with_null: bool = True):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"label_dropout={dropout} is invalid; allowed: 0 <= label_dropout < 1")
        if dropout and not with_null:
            raise ValueError(f"label_dropout={dropout} needs a null label; allowed: label_dropout=0 with "
                             "with_null=False")
        self.num_classes, self.dropout, self.with_null = num_classes, dropout, with_null
        self.embed = nn.Embedding(num_classes + int(with_null), num_channels)

    @property
    def null_label(self) -> int | None:
        """The index of the null label (``num_classes``), None for a table without one."""
        return self.num_classes if self.with_null else None

    def forward(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels is None:
            if not self.with_null:
                raise ValueError(f"labels=None for a class-conditional network without a null label "
                                 f"(num_classes={self.num_classes}); allowed: class labels in [0, {self.num_classes})")
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        elif self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embed(labels.long())


def group_norm(num_channels: int, eps: float = 1e-5, max_groups: int = 32,
               min_channels_per_group: int = 4) -> nn.GroupNorm:
    """GroupNorm with ``min(max_groups, num_channels // min_channels_per_group)`` groups (EDM's rule,
    so narrow tiny presets still get groups of >= 4 channels)."""
    groups = max(1, min(max_groups, num_channels // min_channels_per_group))
    return nn.GroupNorm(groups, num_channels, eps=eps)


class Resample(nn.Module):
    """Up- or down-sampling by 2 with a separable FIR filter, applied per channel.

    ``filter=(1, 1)`` is box down / nearest up (DDPM++); ``(1, 3, 3, 1)`` is the binomial filter of
    NCSN++ and StyleGAN2 (Song et al. 2021, App. H; Karras et al. 2020). The 2-D kernel is the outer
    product normalised to sum 1 (times 4 for up, so a constant image keeps its value). Hand-written:
    torch has no FIR resampler and the StyleGAN ``upfirdn2d`` op is not packaged for pip.
    Maps ``[B, C, H, W]`` -> ``[B, C, 2H, 2W]`` (up) or ``[B, C, H/2, W/2]`` (down) with the default
    ``padding``; ``padding=0`` down-samples without zero padding, ``[B, C, H, W] -> [B, C, (H - taps)/2 + 1, ...]``
    (EDM's fused conv + down-sampling pads the convolution instead).
    """

    def __init__(self, mode: str, filter: tuple[float, ...] = (1, 1), padding: int | None = None):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"Resample mode={mode!r} is invalid; allowed: 'up', 'down'")
        if len(filter) % 2:
            raise ValueError(f"resample_filter={tuple(filter)} is invalid; allowed: an even number of taps")
        f = torch.tensor([float(tap) for tap in filter])
        self.mode, self.pad = mode, (len(filter) - 1) // 2 if padding is None else padding
        self.register_buffer("kernel", (f.outer(f) / f.sum() ** 2)[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        kernel = self.kernel.to(x.dtype).expand(channels, 1, -1, -1)
        if self.mode == "up":
            return nn.functional.conv_transpose2d(x, 4 * kernel, stride=2, padding=self.pad, groups=channels)
        return nn.functional.conv2d(x, kernel, stride=2, padding=self.pad, groups=channels)


def check_conditioning(net: nn.Module, labels: torch.Tensor | None,
                       augment_labels: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when a backbone gets a condition it was not built for
    (``net.num_classes`` / ``net.augment_dim`` of 0 mean "no such input")."""
    name = type(net).__name__
    if labels is not None and not net.num_classes:
        raise ValueError(f"{name}: got class labels but num_classes=0; "
                         "allowed: labels=None or num_classes > 0")
    if augment_labels is not None:
        if not net.augment_dim:
            raise ValueError(f"{name}: got augment_labels but augment_dim=0; allowed: augment_labels=None "
                             "or augment_dim > 0")
        if augment_labels.shape[-1] != net.augment_dim:
            raise ValueError(f"{name}: augment_labels has {augment_labels.shape[-1]} entries per sample; "
                             f"allowed: augment_dim={net.augment_dim}")


class ConditionEmbedding(nn.Module):
    """The conditioning vector of the small backbones: positional embedding of ``c_noise`` through a
    two-layer SiLU MLP, plus a class embedding (``LabelEmbedding``) when ``num_classes > 0``.
    Maps ``c_noise [B]``, ``labels [B] or None`` -> ``[B, channels]``."""

    def __init__(self, embed_channels: int, channels: int, num_classes: int = 0, label_dropout: float = 0.0):
        super().__init__()
        self.noise = nn.Sequential(PositionalEmbedding(embed_channels), nn.Linear(embed_channels, channels),
                                   nn.SiLU(), nn.Linear(channels, channels))
        self.label = LabelEmbedding(num_classes, channels, label_dropout) if num_classes else None

    def forward(self, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.noise(c_noise)
        if self.label is not None:
            emb = emb + self.label(labels, emb.shape[0], emb.device)
        return emb

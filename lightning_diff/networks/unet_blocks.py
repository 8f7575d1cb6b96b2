"""The residual U-Net block shared by DDPM++/NCSN++ (``SongUNet``) and ADM (``DhariwalUNet``).

One block is the union of the features of both papers, as NVlabs/edm's ``UNetBlock``: GroupNorm-SiLU-conv
twice, the noise embedding injected as a bias (DDPM++/NCSN++) or as an adaptive scale and shift (ADM's
"AdaGN", Dhariwal & Nichol 2021, Sec. 3), optional FIR up/down-sampling inside the block (BigGAN-style
resampling residual blocks, Brock et al. 2019), and optional multi-head self-attention after it.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn
from torch.nn import functional as F

from .layers import Resample, group_norm

__all__ = ["SelfAttention2d", "UNetBlock"]


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of ``[B, C, H, W]`` (GroupNorm, then timm's
    ``Attention`` on the ``H*W`` tokens); returns only the update, the caller adds the residual."""

    def __init__(self, channels: int, num_heads: int, eps: float = 1e-5, norm_groups: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: channels={channels} is not divisible by num_heads={num_heads}")
        self.norm = _group_norm(channels, eps, norm_groups)
        self.attn = Attention(channels, num_heads=num_heads, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        return self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)


def _group_norm(channels: int, eps: float, groups: int | None) -> nn.GroupNorm:
    """GroupNorm with exactly ``groups`` groups (ADM's GroupNorm32: 32), or EDM's rule (``group_norm``) for None."""
    return group_norm(channels, eps) if groups is None else nn.GroupNorm(groups, channels, eps=eps)


def _resample(up: bool, down: bool, filter: tuple[float, ...]) -> nn.Module:
    if up and down:
        raise ValueError("UNetBlock: up=True and down=True together; allowed: at most one of them")
    return Resample("up" if up else "down", filter) if up or down else nn.Identity()


class UNetBlock(nn.Module):
    """Residual block ``[B, in_channels, H, W] -> [B, out_channels, H', W']`` conditioned on ``emb``
    ``[B, emb_channels]`` (``H' = 2H`` with ``up``, ``H/2`` with ``down``).

    ``conv1`` and the attention output projection are the layers the papers zero-initialise (the
    networks apply their own init scheme; see ``zero_init_layers``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,  # Upsample by 2 inside the block.
        down: bool = False,  # Downsample by 2 inside the block.
        attention: bool = False,  # Self-attention after the residual branch.
        num_heads: int = 1,  # Attention heads.
        dropout: float = 0.0,  # Dropout before the second convolution.
        skip_scale: float = 1.0,  # Output scale after each residual sum: sqrt(1/2) for DDPM++/NCSN++.
        eps: float = 1e-5,  # GroupNorm epsilon: 1e-6 for DDPM++/NCSN++.
        resample_filter: tuple[float, ...] = (1, 1),  # FIR taps of the up/down-sampling.
        resample_proj: bool = False,  # 1x1 conv on a resampled skip even when channels match (DDPM++).
        adaptive_scale: bool = True,  # Embedding as scale and shift (ADM) instead of a bias (DDPM++).
        norm_groups: int | None = None,  # GroupNorm groups; None: min(32, C // 4) (EDM), 32: ADM's GroupNorm32.
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.adaptive_scale, self.skip_scale = adaptive_scale, skip_scale
        self.norm0 = _group_norm(in_channels, eps, norm_groups)
        self.resample = _resample(up, down, resample_filter)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = _group_norm(out_channels, eps, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        project = out_channels != in_channels or (resample_proj and (up or down))
        self.skip = nn.Sequential(_resample(up, down, resample_filter),
                                  nn.Conv2d(in_channels, out_channels, 1) if project else nn.Identity())
        self.attn = SelfAttention2d(out_channels, num_heads, eps, norm_groups) if attention else None

    def zero_init_layers(self) -> list[nn.Module]:
        """The layers that end a residual branch (initialised to (near) zero by the papers)."""
        return [self.conv1] + ([self.attn.attn.proj] if self.attn is not None else [])

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:  # ADM's AdaGN: GroupNorm(h) (1 + scale) + shift.
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        x = (h + self.skip(x)) * self.skip_scale
        if self.attn is not None:
            x = (x + self.attn(x)) * self.skip_scale
        return x

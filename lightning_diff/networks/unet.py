"""A small U-Net for 8x8 to 32x32 images (the CPU preset; the paper U-Nets live beside it)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ConditionEmbedding

__all__ = ["TinyUNet"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with an adaptive scale/shift from the embedding (DDPM++ style)."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        self.norm, self.heads = _norm(channels), heads
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class TinyUNet(nn.Module):
    """``F(x, c_noise, labels)`` for ``x`` ``[B, C, H, W]`` (H, W divisible by 2^(levels-1)).

    One resolution level per entry of ``channel_mult``, ``num_blocks`` residual blocks each, self-attention
    at the resolutions in ``attn_resolutions``; zero-initialised output so D starts at ``c_skip x``.
    """

    def __init__(
        self,
        in_channels: int = 1,  # Image channels.
        out_channels: int | None = None,  # Output channels (2x in_channels for a learned variance).
        model_channels: int = 32,  # Channels at the first resolution.
        channel_mult: tuple[int, ...] = (1, 2),  # Channel multiplier per resolution.
        num_blocks: int = 1,  # Residual blocks per resolution.
        attn_resolutions: tuple[int, ...] = (),  # Resolutions (image side) with self-attention.
        resolution: int = 8,  # Image side, to place attention.
        dropout: float = 0.0,  # Dropout inside residual blocks.
        num_classes: int = 0,  # 0 = unconditional.
        label_dropout: float = 0.0,  # Probability of the null label during training (CFG).
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        emb = 4 * model_channels
        self.embed = ConditionEmbedding(model_channels, emb, num_classes, label_dropout)
        self.inp = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        chans = [model_channels * m for m in channel_mult]
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c, res = [model_channels], model_channels, resolution
        for level, ch in enumerate(chans):
            for _ in range(num_blocks):
                self.down.append(ResBlock(c, ch, emb, dropout))
                c = ch
                if res in attn_resolutions:
                    self.down.append(SelfAttention(c))
                skips.append(c)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout), SelfAttention(c), ResBlock(c, c, emb, dropout)])
        for level, ch in reversed(list(enumerate(chans))):
            for _ in range(num_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch, emb, dropout))
                c = ch
                if res in attn_resolutions:
                    self.up.append(SelfAttention(c))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, labels)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
                hs.append(h)
            elif isinstance(layer, SelfAttention):
                h = layer(h)
                hs[-1] = h
            else:  # downsample
                h = layer(h)
                hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)

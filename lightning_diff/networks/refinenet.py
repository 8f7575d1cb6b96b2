"""RefineNet score networks of NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020).

Both are the RefineNet of Lin et al. 2017 with pre-activation residual blocks and ELU (NCSN App. A; NCSNv2 App.
B.1): an encoder of four stages of two residual blocks each (widths ngf, 2ngf, 2ngf, 2ngf; stage 2 halves the
resolution by a mean-pooled convolution, stages 3 and 4 keep it and dilate their convolutions by 2 and 4), then
four RefineNet blocks (residual conv units, multi-resolution fusion, chained residual pooling) from the coarsest
stage back to the first, a last norm, ELU and 3x3 convolution.

- ``num_levels > 0``: NCSN's ``CondRefineNetDilated``. Every normalisation is conditional instance
  normalisation++ (NCSN eq. 10, App. A.1: ``gamma[i] * (IN(x) + alpha[i] * normalised channel means) + beta[i]``,
  per noise level ``i``), chained residual pooling averages (5x5). The network is the score ``s(x, i)``; in our
  ``D = x + sigma F`` (``formulation=ncsn``: ``c_out = sigma``, ``c_noise`` the level index) the backbone gives
  ``F = sigma_i s(x, i)``, so the module holds the geometric levels ``sigma_i`` (non-trainable).
- ``num_levels = 0``: NCSNv2's unconditional RefineNet (NCSNv2 Technique 3: ``s(x, sigma) = h(x) / sigma``),
  instance normalisation++ without levels, chained residual pooling by max (5x5). Its score ``h / sigma`` is
  our ``F / sigma`` with ``F = h``: the division by sigma is ``formulation=ncsn``'s ``c_out``; ``c_noise`` is
  not used.

The layout and parameter count equal ermongroup/ncsnv2 ``models/ncsn.py`` (``NCSN``) and ``models/ncsnv2.py``
(``NCSNv2``) (tests/test_refinenet.py builds them from the mirror and compares counts and outputs). Input:
``x`` in [-1, 1] space (their ``2 x - 1`` of [0, 1] data), ``[B, C, H, W]`` with H, W even.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RefineNet"]


class InstanceNormPlus(nn.Module):
    """Instance normalisation++ (NCSN eq. 10): ``gamma (IN(x) + alpha m~) + beta`` where ``m~`` are the channel
    means of ``x`` standardised across channels. ``num_levels > 0``: ``gamma, alpha, beta`` per level (one
    embedding row of 3C per level, as NCSN's ``ConditionalInstanceNorm2dPlus``); else one set."""

    def __init__(self, channels: int, num_levels: int = 0,
                 eps: float = 1e-5):  # added to the variance of the channel means (NCSN's code)
        super().__init__()
        self.channels, self.num_levels, self.eps = channels, num_levels, eps
        if num_levels:
            self.embed = nn.Embedding(num_levels, 3 * channels)  # [gamma | alpha | beta] per level
            nn.init.normal_(self.embed.weight[:, : 2 * channels], 1.0, 0.02)
            nn.init.zeros_(self.embed.weight[:, 2 * channels:])
        else:
            self.alpha = nn.Parameter(torch.empty(channels).normal_(1.0, 0.02))
            self.gamma = nn.Parameter(torch.empty(channels).normal_(1.0, 0.02))
            self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        means = x.mean(dim=(2, 3))  # [B, C]
        means = (means - means.mean(-1, keepdim=True)) / (means.var(-1, keepdim=True) + self.eps).sqrt()
        h = F.instance_norm(x, eps=self.eps)
        if self.num_levels:
            gamma, alpha, beta = self.embed(level).chunk(3, dim=-1)
        else:
            gamma, alpha, beta = (p[None] for p in (self.gamma, self.alpha, self.beta))
        h = h + (means * alpha)[..., None, None]
        return gamma[..., None, None] * h + beta[..., None, None]


def _conv3x3(c_in: int, c_out: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)


class _MeanPoolAfter(nn.Module):
    """A convolution then 2x2 mean pooling (NCSN's ``ConvMeanPool``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 2)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm, ELU, conv, norm, ELU, conv, plus the (projected) input.
    ``down``: the second conv is followed by 2x2 mean pooling (or, with ``dilation > 1``, the resolution is
    kept and the convolutions are dilated), and the shortcut is projected the same way."""

    def __init__(self, c_in: int, c_out: int, num_levels: int, down: bool = False, dilation: int = 1):
        super().__init__()
        c_mid = c_in if down else c_out
        self.conv1 = _conv3x3(c_in, c_mid, dilation)
        self.norm2 = InstanceNormPlus(c_mid, num_levels)
        if down and dilation == 1:
            self.conv2, self.skip = _MeanPoolAfter(c_mid, c_out, 3), _MeanPoolAfter(c_in, c_out, 1)
        else:
            self.conv2 = _conv3x3(c_mid, c_out, dilation)
            self.skip = _conv3x3(c_in, c_out, dilation) if down or c_in != c_out else None
        self.norm1 = InstanceNormPlus(c_in, num_levels)

    def forward(self, x, level):
        h = self.conv1(F.elu(self.norm1(x, level)))
        h = self.conv2(F.elu(self.norm2(h, level)))
        return h + (x if self.skip is None else self.skip(x))


class ResidualConvUnit(nn.Module):
    """RefineNet's RCU: ``blocks`` residual units of ``stages`` x (norm if conditional, ELU, 3x3 conv)."""

    def __init__(self, channels: int, blocks: int, stages: int, num_levels: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            unit = nn.ModuleList()
            for _ in range(stages):
                unit.append(InstanceNormPlus(channels, num_levels) if num_levels else nn.Identity())
                unit.append(_conv3x3(channels, channels, bias=False))
            self.blocks.append(unit)

    def forward(self, x, level):
        for unit in self.blocks:
            h = x
            for norm, conv in zip(unit[::2], unit[1::2], strict=True):
                h = conv(F.elu(norm(h, level) if isinstance(norm, InstanceNormPlus) else h))
            x = h + x
        return x


class RefineBlock(nn.Module):
    """RefineNet block: an RCU (2 x 2) per input, multi-resolution fusion (3x3 convs, bilinear upsampling to
    the finest input, sum) when there are two inputs, chained residual pooling (2 stages of 5x5 pooling then
    3x3 conv, summed), output RCU (3 units at the end, else 1)."""

    def __init__(self, c_ins: list[int], channels: int, num_levels: int, end: bool = False):
        super().__init__()
        self.adapt = nn.ModuleList(ResidualConvUnit(c, 2, 2, num_levels) for c in c_ins)
        self.out = ResidualConvUnit(channels, 3 if end else 1, 2, num_levels)
        if len(c_ins) > 1:
            self.fuse_convs = nn.ModuleList(_conv3x3(c, channels) for c in c_ins)
            self.fuse_norms = nn.ModuleList(InstanceNormPlus(c, num_levels) for c in c_ins) if num_levels else None
        self.pool_convs = nn.ModuleList(_conv3x3(channels, channels, bias=False) for _ in range(2))
        self.pool_norms = nn.ModuleList(InstanceNormPlus(channels, num_levels) for _ in range(2)) \
            if num_levels else None
        # NCSN pools by averaging (its CondCRPBlock), NCSNv2 by max (RefineBlock's maxpool=True).
        self.pool = nn.AvgPool2d(5, 1, 2) if num_levels else nn.MaxPool2d(5, 1, 2)

    def forward(self, xs: list[torch.Tensor], level) -> torch.Tensor:
        hs = [adapt(x, level) for adapt, x in zip(self.adapt, xs, strict=True)]
        if len(hs) == 1:
            h = hs[0]
        else:
            size = xs[0].shape[2:]
            h = 0
            for i, (conv, x) in enumerate(zip(self.fuse_convs, hs, strict=True)):
                x = self.fuse_norms[i](x, level) if self.fuse_norms is not None else x
                h = h + F.interpolate(conv(x), size=size, mode="bilinear", align_corners=True)
        h = path = F.elu(h)
        for i, conv in enumerate(self.pool_convs):
            path = self.pool_norms[i](path, level) if self.pool_norms is not None else path
            path = conv(self.pool(path))
            h = path + h
        return self.out(h, level)


class RefineNet(nn.Module):
    """``F(x, c_noise, labels=None)``: NCSN's conditional RefineNet (``num_levels > 0``) or NCSNv2's (``0``).

    Args:
        in_channels: image channels C (from the data when null).
        resolution: image side (from the data; checked to be even).
        model_channels: ngf, the width of the first stage (NCSN, NCSNv2 CIFAR-10: 128).
        num_levels: 0 for NCSNv2; L (the formulation's levels) for NCSN, whose norms embed the level index.
        sigma_max, sigma_min: NCSN only: sigma_1 and sigma_L of the geometric levels (the formulation's), so that
            ``F = sigma_i s(x, i)``.
        num_classes: must be 0 (both networks are class-unconditional).
    Forward: ``x [B, C, H, W]``, ``c_noise [B]`` (NCSN: the level index, integer-valued in [0, L)); returns
    ``[B, C, H, W]``.
    """

    def __init__(self, in_channels: int = 3, resolution: int = 32, model_channels: int = 128,
                 num_levels: int = 0, sigma_max: float | None = None, sigma_min: float | None = None,
                 num_classes: int = 0):
        super().__init__()
        if num_classes:
            raise ValueError(f"network.num_classes={num_classes}: RefineNet (NCSN, NCSNv2) is class-"
                             "unconditional; allowed: 0 (module.conditional=false)")
        if resolution % 2:
            raise ValueError(f"network.resolution={resolution}: allowed: an even image side (one 2x2 pooling)")
        if num_levels and (sigma_max is None or sigma_min is None):
            raise ValueError(f"network.num_levels={num_levels} (NCSN) needs network.sigma_max and sigma_min "
                             "(the formulation's); allowed: both set, or num_levels=0 (NCSNv2)")
        ngf, L = model_channels, num_levels
        self.num_levels = num_levels
        self.begin_conv = _conv3x3(in_channels, ngf)
        self.normalizer = InstanceNormPlus(ngf, L)
        self.end_conv = _conv3x3(ngf, in_channels)
        self.stages = nn.ModuleList([
            nn.ModuleList([ResidualBlock(ngf, ngf, L), ResidualBlock(ngf, ngf, L)]),
            nn.ModuleList([ResidualBlock(ngf, 2 * ngf, L, down=True), ResidualBlock(2 * ngf, 2 * ngf, L)]),
            nn.ModuleList([ResidualBlock(2 * ngf, 2 * ngf, L, down=True, dilation=2),
                           ResidualBlock(2 * ngf, 2 * ngf, L, dilation=2)]),
            nn.ModuleList([ResidualBlock(2 * ngf, 2 * ngf, L, down=True, dilation=4),
                           ResidualBlock(2 * ngf, 2 * ngf, L, dilation=4)]),
        ])
        self.refine = nn.ModuleList([
            RefineBlock([2 * ngf], 2 * ngf, L),
            RefineBlock([2 * ngf, 2 * ngf], 2 * ngf, L),
            RefineBlock([2 * ngf, 2 * ngf], ngf, L),
            RefineBlock([ngf, ngf], ngf, L, end=True),
        ])
        if num_levels:  # NCSN's geometric levels sigma_1 > ... > sigma_L (NCSN Sec. 4.2)
            grid = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num_levels, dtype=torch.float64)
            self.register_buffer("sigmas", grid.float(), persistent=False)

    def _level(self, c_noise: torch.Tensor) -> torch.Tensor:
        level = c_noise.round().long()
        if c_noise.is_meta:  # shapes only (paper sizes built on the meta device): no values to check
            return level
        valid = ((level.to(c_noise.dtype) == c_noise) & (level >= 0) & (level < self.num_levels)).all()
        allowed = (f"allowed: level indices 0..{self.num_levels - 1} (formulation=ncsn with num_levels="
                   f"{self.num_levels})")
        if c_noise.device.type != "cpu":  # checked on the device: no host sync per forward
            torch._assert_async(valid, f"RefineNet(num_levels={self.num_levels}): c_noise out of range; {allowed}")
        elif not valid:
            raise ValueError(f"RefineNet(num_levels={self.num_levels}): c_noise holds {c_noise.tolist()[:4]}...; "
                             f"{allowed}")
        return level

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        level = self._level(c_noise.reshape(-1).expand(x.shape[0])) if self.num_levels else None
        h = self.begin_conv(x)
        skips = []
        for stage in self.stages:
            for block in stage:
                h = block(h, level)
            skips.append(h)
        h = self.refine[0]([skips[3]], level)
        for block, skip in zip(self.refine[1:], reversed(skips[:3]), strict=True):
            h = block([skip, h], level)
        out = self.end_conv(F.elu(self.normalizer(h, level)))
        if self.num_levels:
            out = out * self.sigmas[level].to(out.dtype)[:, None, None, None]
        return out

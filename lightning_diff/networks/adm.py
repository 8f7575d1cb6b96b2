"""ADM, the U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", Sec. 3 and App. C), in the form
EDM uses it (Karras et al. 2022, NVlabs/edm ``DhariwalUNet``; ImageNet-64 config in EDM Table 7)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import LabelEmbedding, PositionalEmbedding, check_conditioning, group_norm
from .unet_blocks import UNetBlock

__all__ = ["ConvResample", "DhariwalUNet"]


class ConvResample(nn.Module):
    """ADM's resampling layers without a residual block (guided-diffusion ``resblock_updown=False``,
    ``conv_resample=True``): ``down`` a 3x3 convolution of stride 2, ``up`` nearest-neighbour x2 then a 3x3
    convolution. ``[B, C, H, W] -> [B, C, H/2, W/2]`` or ``[B, C, 2H, 2W]``; the embedding is not used."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"ConvResample mode={mode!r} is invalid; allowed: 'up', 'down'")
        self.mode = mode
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if mode == "down" else 1, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest") if self.mode == "up" else x)


class DhariwalUNet(nn.Module):
    """``F(x, c_noise, labels=None, augment_labels=None)``: ``x`` ``[B, in_channels, R, R]`` ->
    ``[B, out_channels, R, R]``; ``c_noise`` ``[B]`` (any scale), ``labels`` ``[B]`` long or None (the
    learned null label), ``augment_labels`` ``[B, augment_dim]``.

    Adaptive group norm in every block, multi-head attention (``channels_per_head`` channels per head, or
    ``num_heads`` heads) at every block of the resolutions in ``attn_resolutions``, BigGAN up/down-sampling
    residual blocks. Init as the paper (PyTorch's default uniform init, which equals EDM's
    ``kaiming_uniform * sqrt(1/3)``), with every residual-branch end, the augmentation map and the output conv
    at exactly zero.

    Every guided-diffusion ``UNetModel`` is one setting of this class (``pretrained.adm``): its
    ``num_heads``/``num_heads_upsample`` (fixed head counts), ``use_scale_shift_norm`` (``adaptive_scale``),
    ``resblock_updown``, ``GroupNorm32`` (``norm_groups=32``), a label table without a null row
    (``with_null_label=False``) and any ``channel_mult`` (0.5 for 512 px).
    """

    def __init__(
        self,
        in_channels: int = 3,  # Image channels at the input.
        out_channels: int | None = None,  # Output channels; None = in_channels, 2x for a learned variance.
        resolution: int = 64,  # Image side at the input (places attention).
        num_classes: int = 0,  # Class labels, 0 = unconditional.
        label_dropout: float = 0.0,  # Probability of the null label in training (classifier-free guidance).
        augment_dim: int = 0,  # Augmentation-label size (EDM non-leaky augmentation), 0 = none.
        model_channels: int = 192,  # Base multiplier for the number of channels.
        channel_mult: tuple[float, ...] = (1, 2, 3, 4),  # Channel multiplier per resolution.
        channel_mult_emb: int = 4,  # Embedding width = model_channels * channel_mult_emb.
        num_blocks: int = 3,  # Residual blocks per resolution.
        attn_resolutions: tuple[int, ...] = (32, 16, 8),  # Resolutions with self-attention.
        channels_per_head: int = 64,  # Attention head width (at least one head per layer); unused with num_heads.
        dropout: float = 0.10,  # Dropout inside residual blocks.
        num_heads: int | None = None,  # Fixed heads per attention layer (guided-diffusion num_heads); None: width.
        num_heads_upsample: int | None = None,  # Heads of the decoder's attention after the middle; None: num_heads.
        adaptive_scale: bool = True,  # Embedding as scale and shift (use_scale_shift_norm); False: a bias.
        resblock_updown: bool = True,  # Residual blocks resample (BigGAN); False: ConvResample layers.
        norm_groups: int | None = None,  # GroupNorm groups; None: min(32, C // 4) (EDM), 32: ADM's GroupNorm32.
        with_null_label: bool = True,  # A learned null label row for CFG; False: num_classes rows only (ADM).
    ):
        super().__init__()
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"DhariwalUNet: resolution={resolution} is not divisible by "
                             f"2^{len(channel_mult) - 1} (channel_mult={tuple(channel_mult)})")
        for name, value in (("num_heads", num_heads), ("num_heads_upsample", num_heads_upsample),
                            ("norm_groups", norm_groups)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"DhariwalUNet: {name}={value!r} is invalid; allowed: None or an integer >= 1")
        widths = [model_channels * mult for mult in channel_mult]
        if any(w != int(w) or w < 1 for w in widths):
            raise ValueError(f"DhariwalUNet: channel_mult={tuple(channel_mult)} times model_channels={model_channels} "
                             "is not a positive integer at every level; allowed: integral widths")
        widths = [int(w) for w in widths]
        out_channels = out_channels or in_channels
        self.num_classes, self.augment_dim = num_classes, augment_dim
        emb_channels = model_channels * channel_mult_emb
        heads_up = num_heads_upsample or num_heads

        def block(cin: int, cout: int, heads: int | None = num_heads, **kwargs) -> UNetBlock:
            if norm_groups and (cin % norm_groups or cout % norm_groups):
                raise ValueError(f"DhariwalUNet: norm_groups={norm_groups} does not divide the block's channels "
                                 f"({cin} -> {cout}); allowed: a divisor of every width")
            return UNetBlock(cin, cout, emb_channels, num_heads=heads or max(1, cout // channels_per_head),
                             dropout=dropout, adaptive_scale=adaptive_scale, norm_groups=norm_groups, **kwargs)

        def resample(c: int, mode: str) -> nn.Module:
            return block(c, c, **{mode: True}) if resblock_updown else ConvResample(c, mode)

        # Mapping: noise (+ augmentation) embedding -> SiLU MLP, + label embedding, SiLU.
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_augment = nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_label = LabelEmbedding(num_classes, emb_channels, label_dropout, with_null_label) \
            if num_classes else None

        # Encoder: input conv, then per level a downsampling block (level > 0) and num_blocks blocks.
        c = widths[0]
        self.enc_conv = nn.Conv2d(in_channels, c, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [c]
        for level, width in enumerate(widths):
            res = resolution >> level
            if level > 0:
                self.enc.append(resample(c, "down"))
                skips.append(c)
            for _ in range(num_blocks):
                self.enc.append(block(c, width, attention=res in attn_resolutions))
                c = width
                skips.append(c)

        # Decoder: two middle blocks (the first with attention) or an upsampling block, then
        # num_blocks + 1 blocks on the concatenated skips.
        self.dec = nn.ModuleList()
        self.dec_concat: list[bool] = []  # Whether decoder block i takes a skip connection.
        for level, width in reversed(list(enumerate(widths))):
            res = resolution >> level
            middle = [block(c, c, attention=True), block(c, c)] if level == len(widths) - 1 \
                else [resample(c, "up")]
            self.dec.extend(middle)
            self.dec_concat += [False] * len(middle)
            for _ in range(num_blocks + 1):
                attn = res in attn_resolutions
                self.dec.append(block(c + skips.pop(), width, heads=heads_up, attention=attn))
                self.dec_concat.append(True)
                c = width
        self.out_norm = group_norm(c) if norm_groups is None else nn.GroupNorm(norm_groups, c)
        self.out_conv = nn.Conv2d(c, out_channels, 3, padding=1)

        zero = [self.out_conv] + ([self.map_augment] if self.map_augment is not None else [])
        zero += [layer for m in self.modules() if isinstance(m, UNetBlock) for layer in m.zero_init_layers()]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vector ``[B, model_channels * channel_mult_emb]``."""
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(labels, emb.shape[0], emb.device)
        return F.silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        check_conditioning(self, labels, augment_labels)
        emb = self.embed(c_noise, labels, augment_labels)
        h = self.enc_conv(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block, concat in zip(self.dec, self.dec_concat, strict=True):
            h = block(torch.cat([h, skips.pop()], dim=1) if concat else h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))

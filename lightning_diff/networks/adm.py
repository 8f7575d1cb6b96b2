"""ADM, the U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", Sec. 3 and App. C), in the form
EDM uses it (Karras et al. 2022, NVlabs/edm ``DhariwalUNet``; ImageNet-64 config in EDM Table 7)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import LabelEmbedding, PositionalEmbedding, check_conditioning, group_norm
from .unet_blocks import UNetBlock

__all__ = ["AttentionPool2d", "ConvResample", "DhariwalEncoder", "DhariwalUNet", "POOLS"]


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


def _check_widths(name: str, resolution: int, model_channels: int, channel_mult, **counts) -> list[int]:
    """The channel width of every level; ValueError naming the setting for a resolution that the levels do not
    divide, a non-integral width, or a head / group count (``counts``) that is not None or an integer >= 1."""
    if resolution % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"{name}: resolution={resolution} is not divisible by "
                         f"2^{len(channel_mult) - 1} (channel_mult={tuple(channel_mult)})")
    for setting, value in counts.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {setting}={value!r} is invalid; allowed: None or an integer >= 1")
    widths = [model_channels * mult for mult in channel_mult]
    if any(w != int(w) or w < 1 for w in widths):
        raise ValueError(f"{name}: channel_mult={tuple(channel_mult)} times model_channels={model_channels} "
                         "is not a positive integer at every level; allowed: integral widths")
    return [int(w) for w in widths]


def _block_builders(name: str, emb_channels: int, channels_per_head: int, dropout: float, num_heads: int | None,
                    adaptive_scale: bool, norm_groups: int | None, resblock_updown: bool):
    """``(block, resample)``: ADM's residual block ``block(cin, cout, heads=num_heads, **UNetBlock kwargs)`` and
    its resampling layer ``resample(channels, "up" | "down")`` (a resampling block, or ``ConvResample``)."""

    def block(cin: int, cout: int, heads: int | None = num_heads, **kwargs) -> UNetBlock:
        if norm_groups and (cin % norm_groups or cout % norm_groups):
            raise ValueError(f"{name}: norm_groups={norm_groups} does not divide the block's channels "
                             f"({cin} -> {cout}); allowed: a divisor of every width")
        return UNetBlock(cin, cout, emb_channels, num_heads=heads or max(1, cout // channels_per_head),
                         dropout=dropout, adaptive_scale=adaptive_scale, norm_groups=norm_groups, **kwargs)

    def resample(c: int, mode: str) -> nn.Module:
        return block(c, c, **{mode: True}) if resblock_updown else ConvResample(c, mode)

    return block, resample


def _encoder(in_channels: int, widths: list[int], resolution: int, num_blocks: int, attn_resolutions, block,
             resample) -> tuple[nn.Conv2d, nn.ModuleList, list[int]]:
    """ADM's encoder: the input conv, then per level a downsampling layer (level > 0) and ``num_blocks`` blocks
    (attention at ``attn_resolutions``). Returns ``(input conv, layers, channels of every skip)``."""
    c = widths[0]
    conv, layers, skips = nn.Conv2d(in_channels, c, 3, padding=1), nn.ModuleList(), [c]
    for level, width in enumerate(widths):
        res = resolution >> level
        if level > 0:
            layers.append(resample(c, "down"))
            skips.append(c)
        for _ in range(num_blocks):
            layers.append(block(c, width, attention=res in attn_resolutions))
            c = width
            skips.append(c)
    return conv, layers, skips


def _zero_init(net: nn.Module, layers: list[nn.Module]) -> None:
    """Zero ``layers`` and every residual-branch end of ``net``'s blocks (the papers' init)."""
    layers = layers + [layer for m in net.modules() if isinstance(m, UNetBlock) for layer in m.zero_init_layers()]
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


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
        widths = _check_widths(type(self).__name__, resolution, model_channels, channel_mult, num_heads=num_heads,
                               num_heads_upsample=num_heads_upsample, norm_groups=norm_groups)
        out_channels = out_channels or in_channels
        self.num_classes, self.augment_dim = num_classes, augment_dim
        emb_channels = model_channels * channel_mult_emb
        heads_up = num_heads_upsample or num_heads
        block, resample = _block_builders(type(self).__name__, emb_channels, channels_per_head, dropout, num_heads,
                                          adaptive_scale, norm_groups, resblock_updown)

        # Mapping: noise (+ augmentation) embedding -> SiLU MLP, + label embedding, SiLU.
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_augment = nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_label = LabelEmbedding(num_classes, emb_channels, label_dropout, with_null_label) \
            if num_classes else None

        self.enc_conv, self.enc, skips = _encoder(in_channels, widths, resolution, num_blocks, attn_resolutions,
                                                  block, resample)
        c = widths[-1]

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

        _zero_init(self, [self.out_conv] + ([self.map_augment] if self.map_augment is not None else []))

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


class AttentionPool2d(nn.Module):
    """Attention pooling of ADM's classifier head (Dhariwal & Nichol 2021, App. B; guided-diffusion
    ``AttentionPool2d``, after CLIP, Radford et al. 2021): the mean token and the ``H*W`` pixel tokens, each plus a
    learned position embedding, multi-head attention of the mean token's query over all tokens, then a projection.
    ``[B, C, H, W] -> [B, out_channels]``; ``tokens = H*W + 1``."""

    def __init__(self, channels: int, tokens: int, channels_per_head: int, out_channels: int):
        super().__init__()
        if channels % channels_per_head:
            raise ValueError(f"AttentionPool2d: channels={channels} is not divisible by "
                             f"channels_per_head={channels_per_head}; allowed: a divisor of the width")
        self.num_heads = channels // channels_per_head
        self.positional_embedding = nn.Parameter(torch.randn(channels, tokens) / channels**0.5)  # [C, tokens]
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        tokens = x.flatten(2)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1) + self.positional_embedding.to(x.dtype)
        if tokens.shape[-1] != self.positional_embedding.shape[1]:
            raise ValueError(f"AttentionPool2d: {tokens.shape[-1] - 1} pixels for a position embedding of "
                             f"{self.positional_embedding.shape[1] - 1}; allowed: the resolution it was built for")
        q, k, v = self.qkv(tokens.transpose(1, 2)).reshape(B, -1, 3, self.num_heads, C // self.num_heads).unbind(2)
        pooled = F.scaled_dot_product_attention(q[:, :1].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(pooled.transpose(1, 2).reshape(B, C))  # the mean token's output only, as the source


POOLS = ("attention", "adaptive")


class DhariwalEncoder(nn.Module):
    """ADM's noise-conditional classifier, the encoder half of the U-Net (Dhariwal & Nichol 2021, Sec. 4.1 and
    App. B; guided-diffusion ``EncoderUNetModel``): ``F(x, c_noise) -> logits [B, num_classes]`` for ``x``
    ``[B, in_channels, R, R]`` and ``c_noise`` ``[B]`` (any scale: guided-diffusion's classifiers take the
    0..T-1 timestep).

    Built from ``DhariwalUNet``'s pieces: the same noise mapping (no labels), the same encoder, the U-Net's two
    middle blocks (the first with attention), then GroupNorm, SiLU and a pooled head: ``pool="attention"``
    (``AttentionPool2d``, the released classifiers') or ``"adaptive"`` (spatial mean and a linear map, the
    ``1x1`` conv of guided-diffusion, zero-initialised as there). ``create_classifier`` of guided-diffusion is
    ``channels_per_head=64, norm_groups=32`` and its ``classifier_*`` flags (``pretrained.adm.load_classifier``).
    """

    def __init__(
        self,
        in_channels: int = 3,  # Image channels at the input.
        num_classes: int = 1000,  # Classes (logits) at the output.
        resolution: int = 64,  # Image side at the input (places attention, sizes the pool's position embedding).
        model_channels: int = 128,  # Base width (guided-diffusion classifier_width).
        channel_mult: tuple[float, ...] = (1, 2, 3, 4),  # Channel multiplier per resolution (create_classifier's).
        channel_mult_emb: int = 4,  # Embedding width = model_channels * channel_mult_emb.
        num_blocks: int = 2,  # Residual blocks per resolution (classifier_depth).
        attn_resolutions: tuple[int, ...] = (32, 16, 8),  # Resolutions with self-attention.
        channels_per_head: int = 64,  # Attention head width (create_classifier's num_head_channels=64).
        dropout: float = 0.0,  # Dropout inside residual blocks.
        num_heads: int | None = None,  # Fixed heads per attention layer; None: from channels_per_head.
        adaptive_scale: bool = True,  # Embedding as scale and shift (classifier_use_scale_shift_norm).
        resblock_updown: bool = True,  # Residual blocks downsample (classifier_resblock_updown).
        norm_groups: int | None = None,  # GroupNorm groups; None: min(32, C // 4) (EDM), 32: ADM's GroupNorm32.
        pool: str = "attention",  # Head: 'attention' (the released classifiers) or 'adaptive' (classifier_pool).
    ):
        super().__init__()
        name = type(self).__name__
        if pool not in POOLS:
            raise ValueError(f"{name}: pool={pool!r} is not known; allowed: {', '.join(POOLS)}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"{name}: num_classes={num_classes!r} is invalid; allowed: an integer >= 2")
        widths = _check_widths(name, resolution, model_channels, channel_mult, num_heads=num_heads,
                               norm_groups=norm_groups)
        emb_channels = model_channels * channel_mult_emb
        block, resample = _block_builders(name, emb_channels, channels_per_head, dropout, num_heads, adaptive_scale,
                                          norm_groups, resblock_updown)
        self.num_classes, self.pool = num_classes, pool
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.enc_conv, self.enc, _ = _encoder(in_channels, widths, resolution, num_blocks, attn_resolutions,
                                              block, resample)
        c = widths[-1]
        self.mid = nn.ModuleList([block(c, c, attention=True), block(c, c)])
        self.out_norm = group_norm(c) if norm_groups is None else nn.GroupNorm(norm_groups, c)
        side = resolution >> (len(widths) - 1)
        self.head = AttentionPool2d(c, side * side + 1, channels_per_head, num_classes) if pool == "attention" \
            else nn.Linear(c, num_classes)
        _zero_init(self, [self.head] if pool == "adaptive" else [])

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(self.map_noise(c_noise)))))
        h = self.enc_conv(x)
        for block in (*self.enc, *self.mid):
            h = block(h, emb)
        h = F.silu(self.out_norm(h))
        return self.head(h) if self.pool == "attention" else self.head(h.mean(dim=(2, 3)))

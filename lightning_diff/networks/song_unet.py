"""DDPM++ and NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H) in the
form EDM uses them (Karras et al. 2022, NVlabs/edm ``SongUNet``; its CIFAR-10 configs in Table 7)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .layers import FourierEmbedding, LabelEmbedding, PositionalEmbedding, Resample, check_conditioning, group_norm
from .unet_blocks import UNetBlock

__all__ = ["SongUNet"]

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _check_choice(setting: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"SongUNet: {setting}={value!r} is invalid; allowed: {', '.join(allowed)}")


class SongUNet(nn.Module):
    """``F(x, c_noise, labels=None, augment_labels=None)``: ``x`` ``[B, in_channels, R, R]`` ->
    ``[B, out_channels, R, R]``; ``c_noise`` ``[B]`` (any scale: ``999 t``, ``ln(sigma)/4``, an index),
    ``labels`` ``[B]`` long or None (the learned null label), ``augment_labels`` ``[B, augment_dim]``.

    DDPM++ = positional embedding, standard encoder, resample filter (1, 1); NCSN++ = Fourier embedding
    with ``channel_mult_noise=2``, residual encoder, filter (1, 3, 3, 1). Initialisation as EDM: Xavier
    uniform, residual-branch ends and output conv scaled by 1e-5, attention qkv by sqrt(0.2).
    """

    def __init__(
        self,
        in_channels: int = 3,  # Image channels at the input.
        out_channels: int | None = None,  # Output channels; None = in_channels, 2x for a learned variance.
        resolution: int = 32,  # Image side at the input (places attention).
        num_classes: int = 0,  # Class labels, 0 = unconditional.
        label_dropout: float = 0.0,  # Probability of the null label in training (classifier-free guidance).
        augment_dim: int = 0,  # Augmentation-label size (EDM non-leaky augmentation: 9), 0 = none.
        model_channels: int = 128,  # Base multiplier for the number of channels.
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),  # Channel multiplier per resolution.
        channel_mult_emb: int = 4,  # Embedding width = model_channels * channel_mult_emb.
        num_blocks: int = 4,  # Residual blocks per resolution.
        attn_resolutions: tuple[int, ...] = (16,),  # Resolutions with self-attention.
        dropout: float = 0.10,  # Dropout inside residual blocks.
        embedding_type: str = "positional",  # Noise embedding: 'positional' (DDPM++), 'fourier' (NCSN++).
        channel_mult_noise: int = 1,  # Noise embedding width multiplier: 1 for DDPM++, 2 for NCSN++.
        encoder_type: str = "standard",  # 'standard' (DDPM++), 'skip', 'residual' (NCSN++).
        decoder_type: str = "standard",  # 'standard' (both), 'skip'.
        resample_filter: tuple[float, ...] = (1, 1),  # FIR taps: (1, 1) DDPM++, (1, 3, 3, 1) NCSN++.
    ):
        super().__init__()
        _check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        _check_choice("decoder_type", decoder_type, DECODER_TYPES)
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"SongUNet: resolution={resolution} is not divisible by "
                             f"2^{len(channel_mult) - 1} (channel_mult={tuple(channel_mult)})")
        out_channels = out_channels or in_channels
        self.num_classes, self.augment_dim = num_classes, augment_dim
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=tuple(resample_filter), resample_proj=True,
                     adaptive_scale=False)

        # Mapping: noise (+ label + augmentation) embedding -> two SiLU layers.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = LabelEmbedding(num_classes, noise_channels, label_dropout) if num_classes else None
        self.map_augment = nn.Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(noise_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        # Encoder: per level, a downsampling block (level > 0), the optional input-pyramid branch, blocks.
        self.enc_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips, c, caux = [model_channels], model_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res, stage = resolution >> level, nn.ModuleDict()
            if level > 0:
                stage["down"] = UNetBlock(c, c, down=True, **block)
                if encoder_type == "skip":  # Input pyramid: downsampled image, 1x1 conv, added.
                    stage["aux_down"] = Resample("down", resample_filter)
                    stage["aux_skip"] = nn.Conv2d(caux, c, 1)
                # NCSN++ input residual: 3x3 conv, downsample, averaged in. As EDM's fused conv + downsample
                # (``fused_resample``): the conv pads by 1 + the filter's padding, the FIR pads by nothing.
                if encoder_type == "residual":
                    filter_pad = (len(resample_filter) - 1) // 2
                    stage["aux_residual"] = nn.Sequential(nn.Conv2d(caux, c, 3, padding=1 + filter_pad),
                                                          Resample("down", resample_filter, padding=0))
                    caux = c
                skips.append(c)
            stage["blocks"] = nn.ModuleList()
            for _ in range(num_blocks):
                attn = res in attn_resolutions
                stage["blocks"].append(UNetBlock(c, model_channels * mult, attention=attn, **block))
                c = model_channels * mult
                skips.append(c)
            self.enc.append(stage)

        # Decoder: per level, two middle blocks (lowest level) or an upsampling block, num_blocks + 1
        # blocks on the concatenated skips, and an output head (every level with decoder_type='skip').
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res, stage = resolution >> level, nn.ModuleDict()
            if level == len(channel_mult) - 1:
                stage["mid"] = nn.ModuleList([UNetBlock(c, c, attention=True, **block),
                                              UNetBlock(c, c, **block)])
            else:
                stage["mid"] = nn.ModuleList([UNetBlock(c, c, up=True, **block)])
            stage["blocks"] = nn.ModuleList()
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                cin = c + skips.pop()
                stage["blocks"].append(UNetBlock(cin, model_channels * mult, attention=attn, **block))
                c = model_channels * mult
            if decoder_type == "skip" or level == 0:
                stage["head"] = nn.Sequential(group_norm(c, eps=1e-6), nn.SiLU(),
                                              nn.Conv2d(c, out_channels, 3, padding=1))
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    stage["aux_up"] = Resample("up", resample_filter)
            self.dec.append(stage)
        self._init_weights()

    def _init_weights(self) -> None:
        """EDM's SongUNet init: Xavier uniform, zero biases, residual-branch ends and heads x 1e-5,
        attention qkv x sqrt(0.2)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, UNetBlock):
                for layer in m.zero_init_layers():
                    nn.init.xavier_uniform_(layer.weight, gain=1e-5)
                if m.attn is not None:
                    nn.init.xavier_uniform_(m.attn.attn.qkv.weight, gain=math.sqrt(0.2))
        for stage in self.dec:
            if "head" in stage:
                nn.init.xavier_uniform_(stage["head"][-1].weight, gain=1e-5)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vector ``[B, model_channels * channel_mult_emb]``."""
        emb = self.map_noise(c_noise)
        if self.map_label is not None:
            emb = emb + self.map_label(labels, emb.shape[0], emb.device)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        check_conditioning(self, labels, augment_labels)
        emb = self.embed(c_noise, labels, augment_labels)
        h, aux = self.enc_conv(x), x
        skips = [h]
        for stage in self.enc:
            if "down" in stage:
                h = stage["down"](h, emb)
                if "aux_skip" in stage:
                    aux = stage["aux_down"](aux)
                    h = h + stage["aux_skip"](aux)
                elif "aux_residual" in stage:
                    h = aux = (h + stage["aux_residual"](aux)) / math.sqrt(2)
                skips.append(h)
            for block in stage["blocks"]:
                h = block(h, emb)
                skips.append(h)
        out = None
        for stage in self.dec:
            for block in stage["mid"]:
                h = block(h, emb)
            for block in stage["blocks"]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if "head" in stage:
                if "aux_up" in stage:
                    out = stage["aux_up"](out)
                y = stage["head"](h)
                out = y if out is None else out + y
        return out

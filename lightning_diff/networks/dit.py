"""DiT, the Diffusion Transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers"):
patchify, transformer blocks with adaLN-Zero conditioning (Sec. 3.2), linear decoder and unpatchify.
Attention, MLP and patch embedding are timm's layers; the fixed 2-D sin-cos position embedding is DiT's (MAE's)."""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn

from .layers import LabelEmbedding, PositionalEmbedding, check_conditioning

__all__ = ["DiT", "DiTBlock"]


def sincos_2d_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed position embedding of a ``grid x grid`` patch grid, ``[grid * grid, dim]`` float32, patches
    row-major: the first ``dim / 2`` channels encode the column, the last ``dim / 2`` the row, each as
    ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = temperature^(-k / (dim / 4))``, k < dim / 4 (Vaswani et al.
    2017, Sec. 3.5, per axis). This is the channel order of DiT's and MAE's ``get_2d_sincos_pos_embed``, which
    released DiT weights were trained with; timm's ``build_sincos2d_pos_embed`` orders them differently."""
    freqs = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")

    def axis(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(col), axis(row)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x (1 + scale) + shift`` with per-sample ``[B, D]`` parameters over ``[B, T, D]`` tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (DiT Sec. 3.2, Fig. 3): the conditioning regresses shift, scale
    and a gate for the attention and the MLP; the regression is zero-initialised, so the block starts as
    the identity. Maps tokens ``[B, T, D]`` and conditioning ``[B, D]`` to ``[B, T, D]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        gelu_tanh = lambda: nn.GELU(approximate="tanh")  # DiT's MLP activation.
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=gelu_tanh)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero(nn.Linear(hidden_size, 6 * hidden_size)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """``F(x, c_noise, labels=None, augment_labels=None)``: ``x`` ``[B, in_channels, R, R]`` ->
    ``[B, out_channels, R, R]`` (``R`` divisible by ``patch_size``); ``c_noise`` ``[B]`` (any scale; the
    paper feeds the 0..999 timestep), ``labels`` ``[B]`` long or None (the learned null label).

    Paper configs (DiT Table 1): S depth 12 / width 384 / 6 heads, B 12/768/12, L 24/1024/16,
    XL 28/1152/16; ``/2`` is ``patch_size=2``; ImageNet-256 runs on 32x32x4 latents with a learned
    variance (``out_channels=8``) and 1000 classes.
    """

    def __init__(
        self,
        in_channels: int = 4,  # Input channels (latent channels for the paper's models).
        out_channels: int | None = None,  # Output channels; None = in_channels, 2x for a learned variance.
        resolution: int = 32,  # Input side (latent side 32 for 256px images).
        num_classes: int = 0,  # Class labels, 0 = unconditional.
        label_dropout: float = 0.0,  # Probability of the null label in training (DiT uses 0.1).
        with_null_label: bool = True,  # A learned null label row (DiT has one when trained with label dropout).
        augment_dim: int = 0,  # Augmentation-label size (EDM non-leaky augmentation), 0 = none.
        patch_size: int = 2,  # Patch side p: T = (resolution / p)^2 tokens.
        hidden_size: int = 1152,  # Token width d.
        depth: int = 28,  # Number of DiT blocks N.
        num_heads: int = 16,  # Attention heads.
        mlp_ratio: float = 4.0,  # MLP hidden width / d.
        frequency_embedding_size: int = 256,  # Width of the sinusoidal noise embedding.
    ):
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"DiT: resolution={resolution} is not divisible by patch_size={patch_size}")
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"DiT: hidden_size={hidden_size} is invalid; allowed: divisible by 4 and by "
                             f"num_heads={num_heads}")
        self.out_channels, self.patch_size = out_channels or in_channels, patch_size
        self.num_classes, self.augment_dim = num_classes, augment_dim
        self.x_embedder = PatchEmbed(resolution, patch_size, in_channels, hidden_size, bias=True)
        grid = resolution // patch_size
        self.register_buffer("pos_embed", sincos_2d_position_embedding(grid, hidden_size)[None], persistent=False)
        self.t_embedder = nn.Sequential(PositionalEmbedding(frequency_embedding_size, endpoint=False, exp_form=True),
                                        nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.y_embedder = (LabelEmbedding(num_classes, hidden_size, label_dropout, with_null=with_null_label)
                           if num_classes else None)
        self.augment_embedder = (_zero(nn.Linear(augment_dim, hidden_size, bias=False)) if augment_dim
                                 else None)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), _zero(nn.Linear(hidden_size, 2 * hidden_size)))
        self.final_linear = _zero(nn.Linear(hidden_size, patch_size**2 * self.out_channels))
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's init (its ``initialize_weights``): Xavier-uniform linears and patch projection, N(0, 0.02)
        for the label table and noise MLP, zero adaLN regressions and output layer (adaLN-Zero)."""
        zeroed = {self.final_linear, self.final_adaLN[-1], self.augment_embedder}
        zeroed |= {block.adaLN_modulation[-1] for block in self.blocks}
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in zeroed:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.t_embedder[1].weight, std=0.02)
        nn.init.normal_(self.t_embedder[3].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embed.weight, std=0.02)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, T, p*p*C]`` -> image ``[B, C, H, W]`` (row-major patches, ``T = (H/p)(W/p)``)."""
        B, T, _ = x.shape
        p, c, side = self.patch_size, self.out_channels, int(round(T**0.5))
        x = x.reshape(B, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, side * p, side * p)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        check_conditioning(self, labels, augment_labels)
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(c_noise)
        if self.y_embedder is not None:
            c = c + self.y_embedder(labels, x.shape[0], x.device)
        if self.augment_embedder is not None and augment_labels is not None:
            c = c + self.augment_embedder(augment_labels.to(c.dtype))
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        return self.unpatchify(self.final_linear(_modulate(self.final_norm(tokens), shift, scale)))

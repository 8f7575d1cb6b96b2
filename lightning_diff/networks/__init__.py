"""Backbones ``F(x, c_noise, labels)``: the networks a ``Denoiser`` preconditions."""

from .mlp import MLP
from .unet import TinyUNet

__all__ = ["MLP", "TinyUNet"]

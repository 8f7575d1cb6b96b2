"""Backbones ``F(x, c_noise, labels=None, augment_labels=None)``: the networks a ``Denoiser`` preconditions.

``MLP`` and ``TinyUNet`` are the CPU presets; ``SongUNet`` (DDPM++/NCSN++), ``DhariwalUNet`` (ADM) and
``DiT`` are the networks of the papers (configs in ``configs/network/``); ``DhariwalEncoder`` is ADM's
noise-conditional classifier ``F(x, c_noise) -> logits``.
"""

from .adm import DhariwalEncoder, DhariwalUNet
from .diffusers_wrapper import DiffusersBackbone
from .dit import DiT
from .mlp import MLP
from .refinenet import RefineNet
from .song_unet import SongUNet
from .unet import TinyUNet

__all__ = ["MLP", "TinyUNet", "SongUNet", "DhariwalUNet", "DhariwalEncoder", "DiT", "DiffusersBackbone", "RefineNet"]

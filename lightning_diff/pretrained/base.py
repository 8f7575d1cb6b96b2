"""What every importer of a released checkpoint returns (``lightning_diff.pretrained``; docs/pretrained.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..data.transforms import EDM_PIXELS, DataTransform
from ..denoiser import Denoiser

__all__ = ["Pretrained"]


@dataclass
class Pretrained:
    """A released model as our objects.

    Attributes:
        denoiser: our ``Denoiser`` (our network class, the source's formulation) equal to the source's own
            denoiser; ``pretrained.load`` returns only this.
        data_shape: ``(C, H, W)`` the denoiser works on (the latent shape for latent models such as DiT).
        num_classes: class labels the network takes, 0 = unconditional.
        format: ``edm`` | ``adm`` | ``dit`` | ``diffusers``.
        source: the file or folder it was read from.
        config: the settings the importer read or was given (constructor arguments, flags), for records.
        data_transform: pixels <-> model space of the images (all supported sources: EDM's ``x / 127.5 - 1``).
        decoder: latent models only: a module mapping ``[B, *data_shape]`` latents to images in model space.
        sampler: the source's own sampler as a ``configs/sampler`` node (``name``, ``steps``, ``options``,
            ``time_steps``; its grid's spacing is the formulation's): what ``lightning-diff sample`` / ``evaluate``
            run for the settings they leave null (``SamplerSettings.of_run``); empty: none known.
        guidance: the source's classifier-free guidance gamma (1 = none) for a null ``guidance`` setting.
    """

    denoiser: Denoiser
    data_shape: tuple[int, ...]
    num_classes: int
    format: str
    source: str
    config: dict = field(default_factory=dict)
    data_transform: DataTransform = EDM_PIXELS
    decoder: nn.Module | None = None
    sampler: dict = field(default_factory=dict)
    guidance: float = 1.0

"""Random integer images of any shape: offline stand-in data for smoke runs of the paper presets
(``+smoke=true``), so that a preset's network, loss and optimizer step run without its dataset."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .base import ImageDataModule

__all__ = ["RandomImagesDataModule"]


class RandomImagesDataModule(ImageDataModule):
    """Uniform random 8-bit images ``[channels, resolution, resolution]`` with labels ``i % num_classes``;
    a ``train`` and a ``test`` split of ``num_images`` each, drawn from ``seed`` and ``seed + 1``. They hold
    no signal: they test that a configuration runs, never what it learns.

    Args:
        channels, resolution: the image shape (a smoke run takes them from the preset's network).
        num_classes: class labels (0: unlabelled, every label 0).
        num_images: images per split.
        Other arguments: see ``ImageDataModule`` (``val_fraction`` 0 validates on the ``test`` split).
    """

    name = "random_images"
    splits = ("train", "test")

    def __init__(self, channels: int, resolution: int, num_classes: int = 0, num_images: int = 16,
                 val_fraction: float = 0.0, **kwargs):
        for setting, value in (("channels", channels), ("resolution", resolution), ("num_images", num_images)):
            if type(value) is not int or value < 1:
                raise ValueError(f"data={self.name}: {setting}={value!r} is invalid; allowed: an integer >= 1 "
                                 "(a smoke run reads channels and resolution from network.in_channels and "
                                 "network.resolution: set them when the network leaves them null)")
        if type(num_classes) is not int or num_classes < 0:
            raise ValueError(f"data={self.name}: num_classes={num_classes!r} is invalid; allowed: an integer >= 0")
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.data_shape, self.num_classes, self.num_images = (channels, resolution, resolution), num_classes, num_images

    def load(self, split: str) -> TensorDataset:
        generator = torch.Generator().manual_seed(self.seed + self.splits.index(split))
        images = torch.randint(0, 256, (self.num_images, *self.data_shape), generator=generator, dtype=torch.uint8)
        labels = torch.arange(self.num_images) % max(self.num_classes, 1)
        return TensorDataset(images, labels)

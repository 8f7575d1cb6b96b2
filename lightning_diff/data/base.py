"""``ImageDataModule``: the split, loaders and model-space scaling shared by every image dataset.

A subclass states ``name``, ``data_shape``, ``num_classes`` and ``splits`` and implements ``load(split)``,
which returns the integer images of one official split. Everything else (the held-out split, hflip,
scaling into [-1, 1], deterministic loaders) lives here once.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .loading import ImageDataset, make_loader, split_indices
from .transforms import EDM_PIXELS

__all__ = ["ImageDataModule"]


class ImageDataModule(pl.LightningDataModule):
    """Base class of the image DataModules. Batches are ``(x, labels)``: x float32 ``[B, *data_shape]`` in
    [-1, 1] (``x_int / 127.5 - 1``, recorded in ``.transform``), labels long ``[B]`` class indices.

    Args:
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the held-out split and of the shuffling order (epoch ``e`` uses ``seed + e``).
        val_fraction: fraction of the training split held out (class-stratified) as the validation set;
            0 validates on the official test split, which needs one (``"test" in splits``).
        hflip: add a mirrored copy of every training image (EDM's xflip; doubles the epoch).
        pin_memory: DataLoader ``pin_memory``.
    """

    name: str
    data_shape: tuple[int, ...]
    num_classes: int
    splits: tuple[str, ...] = ("train",)  # Official splits of the dataset; "test" enables test_dataloader.
    transform = EDM_PIXELS

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1,
                 hflip: bool = False, pin_memory: bool = False):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"{self.name}: val_fraction={val_fraction} is not allowed; "
                             "allowed: 0 <= val_fraction < 1")
        if val_fraction == 0 and "test" not in self.splits:
            raise ValueError(f"{self.name}: val_fraction=0 validates on the test split, but {self.name} has "
                             f"only {self.splits}; allowed: 0 < val_fraction < 1")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.hflip, self.pin_memory = val_fraction, hflip, pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def load(self, split: str) -> Dataset:
        """The integer images of official split ``split`` (one of ``self.splits``): a
        ``TensorDataset(uint8 [N, *data_shape], long [N])`` or a lazy dataset with ``.targets``."""
        raise NotImplementedError

    @staticmethod
    def _labels(source: Dataset) -> torch.Tensor:
        if isinstance(source, TensorDataset):
            return source.tensors[1]
        return torch.as_tensor(source.targets)

    @staticmethod
    def _subset(source: Dataset, index: torch.Tensor) -> Dataset:
        if isinstance(source, TensorDataset):
            return TensorDataset(*(t[index] for t in source.tensors))
        return Subset(source, index.tolist())

    def setup(self, stage: str | None = None) -> None:
        """Load the splits once (idempotent; the loaders call it too, so no Trainer is needed)."""
        if self.train_set is not None:
            return
        train = self.load("train")
        test = self.load("test") if "test" in self.splits else None
        if self.val_fraction > 0:
            train_idx, val_idx = split_indices(self._labels(train), self.val_fraction, self.seed)
            train, val = self._subset(train, train_idx), self._subset(train, val_idx)
        else:
            val = test
        self.train_set = ImageDataset(train, self.transform, hflip=self.hflip)
        self.val_set = ImageDataset(val, self.transform)
        self.test_set = None if test is None else ImageDataset(test, self.transform)

    def _loader(self, which: str) -> DataLoader:
        self.setup()
        return make_loader(getattr(self, which), self.batch_size, which == "train_set", self.seed,
                           self.num_workers, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train_set")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val_set")

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ValueError(f"{self.name} has no test split (splits: {self.splits}); its held-out data is "
                             "val_dataloader()")
        return self._loader("test_set")

"""Datasets that yield ready batches ``(x, labels)`` and the deterministic DataLoader around them.

Both datasets implement ``__getitems__`` (a list of indices -> one collated batch), which torch's
DataLoader calls instead of ``__getitem__`` per sample; batches are then built by one tensor index
instead of collating B small tensors, which dominates a training step of a small 2-D model on CPU.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from ..checkpoint_io import ResumableDataLoader
from .transforms import DataTransform, from_uint8

__all__ = ["ImageDataset", "PointDataset", "EpochSampler", "seed_worker", "make_loader", "split_indices"]


class ImageDataset(Dataset):
    """Integer images -> model space.

    Args:
        source: ``TensorDataset(images uint8 [N, C, H, W], labels long [N])`` (in memory, batched
            indexing) or any map-style dataset of ``(uint8 [C, H, W], int label)`` (read lazily).
        transform: the affine map into model space.
        hflip: append a horizontally mirrored copy of every image, so the dataset holds 2N items (EDM's
            ``xflip``: deterministic, independent of worker seeding and of the number of processes).
    Items are ``(x float32 [C, H, W], label long [])``; ``__getitems__`` returns
    ``(x [B, C, H, W], labels [B])``.
    """

    def __init__(self, source: Dataset, transform: DataTransform, hflip: bool = False):
        self.source, self.transform, self.hflip = source, transform, hflip
        self.num_images = len(source)

    def __len__(self) -> int:
        return self.num_images * (2 if self.hflip else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = self.__getitems__([index])
        return x[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        if ((index < 0) | (index >= len(self))).any():
            raise IndexError(f"ImageDataset: indices must lie in [0, {len(self)}), got {indices}")
        real = index % self.num_images
        if isinstance(self.source, TensorDataset):
            images, labels = self.source[real]
        else:
            images, labels = default_collate([self.source[i] for i in real.tolist()])
        x = from_uint8(images, self.transform)
        flip = index >= self.num_images
        x[flip] = x[flip].flip(-1)
        return x, torch.as_tensor(labels, dtype=torch.long)


class PointDataset(Dataset):
    """In-memory points ``x [N, D]`` float32 with labels ``[N]`` long; items ``(x [D], label [])``."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        if len(x) != len(labels):
            raise ValueError(f"PointDataset: {len(x)} points but {len(labels)} labels")
        self.x, self.labels = x.to(torch.float32), labels.to(torch.long)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.labels[index]


class EpochSampler(Sampler[int]):
    """A shuffled order of ``range(n)`` that depends only on ``(seed, epoch)``.

    torch's RandomSampler draws from the global RNG, so its order depends on everything else that consumed
    random numbers before; this one is a function of the epoch (as DistributedSampler is), so a run resumed
    at an epoch boundary sees the same order. Lightning calls ``set_epoch`` every epoch, also through the
    ``DistributedSamplerWrapper`` it puts around this sampler under DDP.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` in a worker from the torch seed DataLoader gave it
    (``base_seed + worker_id``, base_seed drawn from the loader's seeded generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _ready_batch(batch):
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a collated batch."""
    return batch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a dataset with batched ``__getitems__``. Shuffled (training) loaders use ``EpochSampler``
    and are ``ResumableDataLoader``s: their position in the epoch goes into checkpoints."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed; allowed: an integer >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} is not allowed; allowed: an integer >= 0")
    return (ResumableDataLoader if shuffle else DataLoader)(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed) if shuffle else None,
        num_workers=num_workers,
        collate_fn=_ready_batch,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def split_indices(labels: torch.Tensor, val_fraction: float,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic class-stratified split of ``range(len(labels))`` into (train, val) index tensors,
    each sorted; ``val`` holds ``ceil(val_fraction * N)`` items (scikit-learn's ``train_test_split``)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} is not allowed; allowed: 0 < val_fraction < 1")
    labels = np.asarray(labels)
    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=seed,
                                  stratify=labels)
    return torch.as_tensor(np.sort(train)), torch.as_tensor(np.sort(val))

"""Data splits of an image data module as integer images: what the reference statistics and the likelihood
metrics read."""

from __future__ import annotations

import torch

from ..data.transforms import to_uint8

__all__ = ["split_view", "split_batch", "reference_tag"]


def split_view(datamodule, split: str):
    """``(dataset, split used, number of images)`` for split ``"train"``, ``"val"`` or ``"test"`` of an image
    data module; ``"test"`` falls back to ``"val"`` when the data has no test split. The dataset yields
    model-space batches (``ImageDataset``); its first ``num_images`` items are the un-flipped images."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not known; allowed: train, val, test")
    if len(getattr(datamodule, "data_shape", ())) != 3 or getattr(datamodule.transform, "bits", None) is None:
        raise ValueError(f"data={getattr(datamodule, 'name', datamodule)!r} is not integer image data; "
                         "allowed: an image data module (metrics need pixels)")
    datamodule.setup()
    if split == "test" and getattr(datamodule, "test_set", None) is None:
        split = "val"
    dataset = getattr(datamodule, f"{split}_set")
    return dataset, split, getattr(dataset, "num_images", len(dataset))


def split_batch(dataset, transform, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start..stop-1`` as ``(uint8 [n, C, H, W], labels [n])`` (the exact inverse of the data scaling)."""
    x, labels = dataset.__getitems__(list(range(start, stop)))
    return to_uint8(x, transform), labels


def reference_tag(datamodule, split: str, num_images: int, limited: bool) -> str:
    """Split name for the cache key: the held-out fraction and seed, and a limit, change the images."""
    tag = split
    if split in ("train", "val") and getattr(datamodule, "val_fraction", 0) > 0:
        tag += f".holdout{datamodule.val_fraction}.seed{datamodule.seed}"
    return tag + (f".first{num_images}" if limited else "")

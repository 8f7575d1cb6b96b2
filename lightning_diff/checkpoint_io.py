"""What an exact resume needs beyond Lightning's own checkpoint: atomic files and the data-loader position.

- ``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one, never a torn
  write (a job killed while saving, a full disk): ``torch.save`` to a temporary file in the same folder,
  ``fsync``, then ``os.replace``, which POSIX makes atomic. Lightning's ``TorchCheckpointIO`` relies on an
  fsspec transaction whose local commit is a move without ``fsync``; we state the guarantee here once.
- ``ResumableDataLoader``: a ``DataLoader`` with ``state_dict``/``load_state_dict`` (Lightning saves them in
  the checkpoint's loop state and restores them before the first batch), so a run resumed mid-epoch
  continues with the next batch of the same epoch instead of restarting the epoch.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

__all__ = ["AtomicCheckpointIO", "ResumableDataLoader", "resumable"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (temporary file, fsync, ``os.replace``).
    Remote URLs (``s3://``...) go through Lightning's fsspec path (object stores replace whole objects)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise ValueError(f"AtomicCheckpointIO: storage_options={storage_options!r} is not supported for "
                             "local paths; allowed: None")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that remembers how many batches of the current epoch it has handed out.

    ``state_dict()`` -> ``{"batches": n, "generator": state}``; after ``load_state_dict`` the next
    ``iter()`` skips the first ``n`` batches by index (no data is loaded for them) and reuses the
    loader generator's state from the start of that epoch (the worker seeds). The epoch's order comes from
    the sampler (``set_epoch``), which Lightning restores. A loader saved at the end of an epoch resumes
    at the start of the next one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches = 0  # handed out in the current epoch
        self._skip = 0
        self._epoch_generator_state = None

    @property
    def _index_sampler(self):
        # The batches of indices DataLoader's iterator draws from (a private DataLoader property, read once
        # when an iterator is made; there is no public hook to start an epoch at batch n).
        batches = super()._index_sampler
        return _SkipOnce(batches, self._skip) if self._skip else batches

    def __iter__(self):
        if self.generator is not None:
            if self._skip and self._epoch_generator_state is not None:
                self.generator.set_state(self._epoch_generator_state)
            self._epoch_generator_state = self.generator.get_state()
        self._batches = self._skip
        iterator = super().__iter__()
        self._skip = 0
        return self._count(iterator)

    def _count(self, iterator):
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches, "generator": self._epoch_generator_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skip = state_dict["batches"] if state_dict["batches"] < len(self) else 0
        self._epoch_generator_state = state_dict["generator"]


class _SkipOnce:
    """Iterable over ``batches`` whose first iteration starts at batch ``skip`` (later ones at 0)."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)


def resumable(loader: DataLoader) -> ResumableDataLoader:
    """The same loader as a ``ResumableDataLoader`` (same dataset, sampler, batching, workers, generator)."""
    if isinstance(loader, ResumableDataLoader):
        return loader
    batched = loader.batch_size is not None  # else the loader was built from a batch_sampler
    return ResumableDataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler if batched else None,
        batch_sampler=None if batched else loader.batch_sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor,
        multiprocessing_context=loader.multiprocessing_context)

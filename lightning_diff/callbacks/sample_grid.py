"""``SampleGrid``: sample with fixed seeds and the run's sampler, write a PNG grid (images) or scatter plot
(2-D data), log it. ``write_samples`` writes the one ``samples.npz`` layout (with its ``samples.png``) that both
``lightning-diff train`` (this grid) and ``lightning-diff sample`` write."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ..checkpoint_io import atomic_write_all
from ..data.transforms import to_uint8
from ..evaluation import generate

__all__ = ["SampleGrid", "save_image_grid", "save_scatter", "write_samples"]

GRID_IMAGES = 64  # images lightning-diff sample draws in samples.png (samples.npz holds all of them)


def save_image_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``[N, C, H, W]`` uint8 images as one PNG grid (nearest-upscaled to at least 32 px a tile)."""
    import math

    import torchvision

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = images_uint8.float() / 255
    if x.shape[-1] < 32:
        x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    nrow = nrow or int(math.ceil(math.sqrt(x.shape[0])))
    torchvision.utils.save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


def save_scatter(points: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None,
                 title: str = "") -> Path:
    """Scatter plot of ``[N, 2]`` samples, over ``reference`` data when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(*reference[:, :2].T.cpu(), s=2, c="0.7", label="data")
    ax.scatter(*points[:, :2].T.cpu(), s=2, c="C0", label="samples")
    ax.set_title(title)
    ax.set_aspect("equal")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_samples(folder: str | Path, samples: torch.Tensor, labels: torch.Tensor | None, *, data_transform=None,
                  reference: torch.Tensor | None = None, title: str = "", name: str = "samples",
                  grid: int = GRID_IMAGES) -> tuple[Path, Path]:
    """Write ``<folder>/<name>.npz`` and ``<folder>/<name>.png`` as one unit (``checkpoint_io.atomic_write_all``: an
    earlier pair stays whole until both new files are on the disk); returns their paths.

    ``samples``: float model space, images ``[N, C, H, W]`` or points ``[N, D]``; ``labels``: long ``[N]`` or None.
    The ``.npz`` layout: ``images`` uint8 ``[N, C, H, W]`` (image data, rounded as EDM writes PNGs with
    ``data_transform``) or ``samples`` float32 ``[N, D]`` (point data); ``labels`` int64 ``[N]`` for a conditional
    model; ``reference`` float32 ``[M, D]``, held-out data points drawn under 2-D samples, when given. The ``.png``:
    a grid of the first ``grid`` images, or a scatter plot of the points."""
    folder = Path(folder)
    if samples.ndim == 4:
        images = to_uint8(samples.cpu(), data_transform)
        arrays = {"images": images.numpy()}
        draw = partial(save_image_grid, images[:grid])
    else:
        arrays = {"samples": samples.cpu().float().numpy()}
        draw = partial(save_scatter, samples, reference=reference, title=title)
        if reference is not None:
            arrays["reference"] = reference.cpu().float().numpy()
    if labels is not None:
        arrays["labels"] = labels.cpu().long().numpy()
    npz, png = atomic_write_all({folder / f"{name}.npz": lambda file: np.savez(file, **arrays),
                                 folder / f"{name}.png": lambda file: file.write(_rendered(draw))})
    return npz, png


def _rendered(draw: Callable[[Path], Any]) -> bytes:
    """The bytes of the PNG that ``draw(path)`` writes (``save_image_grid`` and ``save_scatter`` take a path,
    not a file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "samples.png"
        draw(path)
        return path.read_bytes()


def _reference_points(datamodule, n: int) -> torch.Tensor | None:
    """Up to ``n`` held-out data points to draw under 2-D samples."""
    if datamodule is None:
        return None
    points, count = [], 0
    for x, _ in datamodule.val_dataloader():
        points.append(x)
        count += len(x)
        if count >= n:
            break
    return torch.cat(points)[:n] if points else None


class SampleGrid(pl.Callback):
    """Samples ``num_samples`` images with seeds ``0..N-1`` using the module's sampler (the run's ``sampler``;
    conditional models get labels ``seed % num_classes``).

    Runs when training ends (with the EMA weights when an EMA callback copied them into the module) and,
    when ``every_n_epochs > 0``, at the end of every n-th validation epoch (EMA weights are swapped in
    during validation). Writes ``dirpath/samples.png`` (or ``samples_epoch{E}.png``) and the samples as
    ``.npz`` in the layout of ``lightning-diff sample`` (``write_samples``; 2-D data also ``reference``, held-out
    points), and logs the PNG to W&B.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 0, dirpath: str = "."):
        if num_samples < 1:
            raise ValueError(f"sample_grid.num_samples={num_samples} is invalid; allowed: an integer >= 1")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.dirpath = Path(dirpath)
        self.artifacts: dict[str, str] = {}

    @rank_zero_only
    def _render(self, trainer: pl.Trainer, module, name: str) -> None:
        samples, labels, _ = generate(module, range(self.num_samples), progress=False)
        reference = None if samples.ndim == 4 else _reference_points(trainer.datamodule, 2000)
        _, path = write_samples(self.dirpath, samples, labels, data_transform=module.data_transform,
                                reference=reference, title=module.formulation.name, name=name, grid=self.num_samples)
        self.artifacts["sample_grid"] = str(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, module):
        epoch = trainer.current_epoch
        if self.every_n_epochs > 0 and not trainer.sanity_checking and (epoch + 1) % self.every_n_epochs == 0:
            self._render(trainer, module, f"samples_epoch{epoch}")

    def on_train_end(self, trainer, module):
        self._render(trainer, module, "samples")

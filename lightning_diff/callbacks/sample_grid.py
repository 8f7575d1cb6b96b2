"""``SampleGrid``: sample with fixed seeds and the run's sampler, write a PNG grid (images) or scatter plot
(2-D data), log it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ..data.transforms import to_uint8
from ..evaluation import generate

__all__ = ["SampleGrid", "save_image_grid", "save_scatter"]


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
    ``.npz`` (key ``samples``, float model space; ``images``, uint8, for image data; ``reference``,
    held-out points, for 2-D data), and logs the PNG to W&B.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 0, dirpath: str = "."):
        if num_samples < 1:
            raise ValueError(f"sample_grid.num_samples={num_samples} is invalid; allowed: an integer >= 1")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.dirpath = Path(dirpath)
        self.artifacts: dict[str, str] = {}

    @rank_zero_only
    def _render(self, trainer: pl.Trainer, module, name: str) -> None:
        samples, _, _ = generate(module, range(self.num_samples), progress=False)
        path = self.dirpath / f"{name}.png"
        arrays = {"samples": samples.cpu().numpy()}
        if samples.ndim == 4:
            images = to_uint8(samples, module.data_transform)
            save_image_grid(images, path)
            arrays["images"] = images.cpu().numpy()
        else:
            reference = _reference_points(trainer.datamodule, 2000)
            save_scatter(samples, path, reference, title=module.formulation.name)
            if reference is not None:
                arrays["reference"] = reference.cpu().numpy()
        np.savez(self.dirpath / f"{name}.npz", **arrays)
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

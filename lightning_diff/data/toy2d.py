"""2-D toys: a ring of Gaussians (with its exact density), two moons, swiss roll, checkerboard."""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import make_moons, make_swiss_roll
from torch.utils.data import DataLoader

from ..analytic import GaussianMixture
from .loading import PointDataset, make_loader
from .transforms import CONTINUOUS

__all__ = ["Toy2DDataModule", "TOY2D_DATASETS", "ring_of_gaussians", "sample_toy2d"]

TOY2D_DATASETS = {  # name -> number of classes its labels take (1: labels are all 0)
    "gaussian_mixture": None,  # num_components
    "two_moons": 2,
    "swiss_roll": 1,
    "checkerboard": 1,
}


def ring_of_gaussians(num_components: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """Equal-weight isotropic Gaussians with means evenly spaced on a circle, the first at angle 0."""
    angle = 2 * math.pi * torch.arange(num_components, dtype=torch.float64) / num_components
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture(means, std)


def sample_toy2d(dataset: str, n: int, seed: int, mixture: GaussianMixture | None = None,
                 noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``(x float32 [n, 2], labels long [n])`` of ``dataset``, a function of ``seed`` only.

    gaussian_mixture: draws from ``mixture`` (labels: the component); two_moons: scikit-learn's moons
    with Gaussian ``noise``, centred by ``(-0.5, -0.25)`` (labels: the moon); swiss_roll: scikit-learn's
    roll with ``noise``, coordinates (x, z) divided by 10 into about [-1, 1.3]; checkerboard: uniform on the
    8 dark squares of a 4x4 board on [-2, 2]^2 (Grathwohl et al. 2019, FFJORD, without their factor 2).
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=np.int64)
    if dataset == "gaussian_mixture":
        labels = rng.choice(len(mixture.weights), size=n, p=mixture.weights.numpy())
        x = mixture.means.numpy()[labels] + mixture.stds.numpy()[labels, None] * rng.standard_normal((n, 2))
    elif dataset == "two_moons":
        x, labels = make_moons(n, noise=noise, random_state=seed)
        x = x - np.array([0.5, 0.25])
    elif dataset == "swiss_roll":
        x3, _ = make_swiss_roll(n, noise=noise, random_state=seed)
        x = x3[:, [0, 2]] / 10
    elif dataset == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
        x = np.stack([x1, x2], axis=1)
    else:
        raise ValueError(f"toy2d: dataset={dataset!r} is not known; allowed: {', '.join(TOY2D_DATASETS)}")
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)


class Toy2DDataModule(pl.LightningDataModule):
    """2-D toy data; batches ``(x float32 [B, 2], labels long [B])``, continuous (``transform.bits`` None).

    Args:
        dataset: one of ``TOY2D_DATASETS``.
        num_samples: size of the training set.
        num_val_samples: size of the held-out set, drawn independently of the training set.
        batch_size, num_workers: DataLoader settings.
        seed: the data and the shuffling order are a function of it (the two sets use independent streams).
        num_components, radius, std: the ring of Gaussians (``gaussian_mixture``); ``.mixture`` is it.
        noise: Gaussian noise of two_moons and swiss_roll.
    """

    name = "toy2d"
    data_shape = (2,)
    transform = CONTINUOUS

    def __init__(self, dataset: str = "gaussian_mixture", num_samples: int = 10_000,
                 num_val_samples: int = 2_000, batch_size: int = 512, num_workers: int = 0, seed: int = 0,
                 num_components: int = 8,  # Gaussians on the ring.
                 radius: float = 1.0,  # Radius of the ring; per-coordinate data std ~0.71.
                 std: float = 0.1,  # Standard deviation of each Gaussian.
                 noise: float = 0.05):  # two_moons / swiss_roll noise.
        super().__init__()
        if dataset not in TOY2D_DATASETS:
            raise ValueError(f"toy2d: dataset={dataset!r} is not known; allowed: {', '.join(TOY2D_DATASETS)}")
        for setting, value in (("num_samples", num_samples), ("num_val_samples", num_val_samples),
                               ("num_components", num_components)):
            if value < 1:
                raise ValueError(f"toy2d: {setting}={value} is not allowed; allowed: an integer >= 1")
        self.dataset, self.num_samples, self.num_val_samples = dataset, num_samples, num_val_samples
        self.batch_size, self.num_workers, self.seed, self.noise = batch_size, num_workers, seed, noise
        is_mixture = dataset == "gaussian_mixture"
        self.mixture = ring_of_gaussians(num_components, radius, std) if is_mixture else None
        self.num_classes = TOY2D_DATASETS[dataset] or num_components
        self.train_set: PointDataset | None = None
        self.val_set: PointDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate both sets once (idempotent)."""
        if self.train_set is not None:
            return
        streams = np.random.SeedSequence(self.seed).spawn(2)  # independent train and val streams
        train_seed, val_seed = (int(s.generate_state(1)[0]) for s in streams)
        self.train_set = PointDataset(*sample_toy2d(self.dataset, self.num_samples, train_seed, self.mixture,
                                                    self.noise))
        self.val_set = PointDataset(*sample_toy2d(self.dataset, self.num_val_samples, val_seed, self.mixture,
                                                  self.noise))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.train_set, self.batch_size, True, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self.val_set, self.batch_size, False, self.seed, self.num_workers)

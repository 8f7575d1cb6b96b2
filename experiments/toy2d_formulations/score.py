"""Score a ``toy2d_formulations`` multirun: the true log-density of each formulation's samples.

The data is the 8-Gaussian ring whose exact density ``Toy2DDataModule().mixture`` knows, so
``E[log p_data(sample)]`` compares the formulations on one number (the data's own value is the target;
higher than it means samples collapsed onto the modes, lower means mass off the modes).
Usage: ``python experiments/toy2d_formulations/score.py multirun/train/toy2d_formulations/<time>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lightning_diff.data import Toy2DDataModule


def main(sweep_dir: str) -> list[tuple[str, float]]:
    mixture = Toy2DDataModule().mixture
    data_ll = mixture.log_prob(mixture.sample(20000, torch.Generator().manual_seed(0))).mean().item()
    rows = []
    for job in sorted(Path(sweep_dir).glob("*/samples.npz"), key=lambda p: int(p.parent.name)):
        name = OmegaConf.load(job.parent / ".hydra/config.yaml").formulation._target_.rsplit(".", 1)[-1]
        samples = torch.as_tensor(np.load(job)["samples"], dtype=torch.float64)
        rows.append((name, mixture.log_prob(samples).mean().item()))
    print(f"{'formulation':<14} E[log p_data(samples)]  (data itself: {data_ll:.3f})")
    for name, ll in rows:
        print(f"{name:<14} {ll:8.3f}   gap {ll - data_ll:+.3f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1])

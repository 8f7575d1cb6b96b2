"""Figures and tables assembled from finished runs (Hydra callbacks run once a multirun ends)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["CompareSamplesFigure", "compare_samples_figure"]


def compare_samples_figure(sweep_dir: str | Path, out: str | Path, key: str = "formulation._target_") -> Path:
    """One figure with a panel per job of a multirun: each job's ``samples.npz`` (2-D samples) over the data.

    Args:
        sweep_dir: the multirun directory (job sub-directories ``0, 1, ...`` with ``.hydra/config.yaml``).
        out: PNG path to write.
        key: config key whose value titles each panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    jobs = sorted((p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml")), key=lambda p: int(p.name))
    jobs = [j for j in jobs if (j / "samples.npz").exists()]
    if not jobs:
        raise FileNotFoundError(f"compare_samples_figure: no job under {sweep_dir} wrote samples.npz")
    cols = min(4, len(jobs))
    rows = (len(jobs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, job in zip(axes.flat, jobs, strict=False):
        cfg = OmegaConf.load(job / ".hydra/config.yaml")
        arrays = np.load(job / "samples.npz")
        samples, data = arrays["samples"], arrays["reference"] if "reference" in arrays else None
        if data is not None:
            ax.scatter(data[:, 0], data[:, 1], s=1, c="0.75")
        ax.scatter(samples[:, 0], samples[:, 1], s=1, c="C0")
        title = str(OmegaConf.select(cfg, key)).rsplit(".", 1)[-1]
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
    fig.suptitle("samples (blue) vs data (grey)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


class CompareSamplesFigure(Callback):
    """Hydra callback: when a multirun ends, draw every job's samples in one figure ``<sweep dir>/<filename>``."""

    def __init__(self, filename: str = "comparison.png", key: str = "formulation._target_"):
        self.filename, self.key = filename, key

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        path = compare_samples_figure(sweep_dir, sweep_dir / self.filename, self.key)
        print(f"comparison figure: {path}")

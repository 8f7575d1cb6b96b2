"""``lightning-diff sample``: generate images from a checkpoint with any sampler (``configs/sample.yaml``).

Writes ``out/samples.npz`` (``images`` uint8 ``[N, C, H, W]`` rounded as EDM writes PNGs, ``labels`` when
conditional; 2-D data: ``samples`` float ``[N, D]``) and ``out/samples.png``; prints NFE and images/s.
The same seed gives the same images whatever ``sampler.batch_size``. Both files are written atomically as one
unit, ``out=`` is checked for writing before any sampling, progress goes to plain lines when stdout is not a
terminal, and Ctrl-C exits with status 130 and one line.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from .builders import load_module, pretrained_flags, resolve_device
from .callbacks.sample_grid import save_image_grid, save_scatter
from .checkpoint_io import atomic_write_all, check_writable
from .classifier import classifier_from_config
from .config import CONFIG_DIR
from .config_check import check_command
from .data.transforms import to_uint8
from .evaluation import generate
from .evaluation.analytic_moments import with_moments

__all__ = ["main", "sample"]


def sample(cfg: DictConfig) -> str:
    """Run ``cfg`` (``configs/sample.yaml``): sample and write ``out/samples.npz`` and ``out/samples.png``, as one
    unit (an earlier pair stays whole until both new files are on the disk). ``out=`` is checked before any work.
    Returns the line ``main`` prints (the paths, weights, sampler, NFE and images/s)."""
    out = check_writable(cfg.out, f"out={cfg.out}")  # a read-only out= fails now, not after the sampling
    module = load_module(cfg.ckpt, weights=cfg.weights, pretrained=pretrained_flags(cfg.pretrained))
    module = module.to(resolve_device(cfg.device))
    sampler, guidance = module.sampler_from_config(cfg.sampler, cfg.guidance)  # null: the checkpoint's own
    sampler = with_moments(sampler, module, **cfg.analytic_dpm).check(module.formulation)  # ddpm variance=analytic
    seeds = range(cfg.seed, cfg.seed + cfg.num_samples)
    classifier, scale = classifier_from_config(cfg.classifier, module.formulation)  # classifier guidance
    samples, labels, stats = generate(module, seeds, sampler=sampler, guidance=guidance,
                                      class_label=cfg.class_label, seed_protocol=cfg.seed_protocol,
                                      classifier=None if classifier is None else classifier.to(module.device),
                                      classifier_scale=scale)
    arrays, draw = _outputs(module, samples, labels)
    npz, png = atomic_write_all({out / "samples.npz": lambda file: np.savez(file, **arrays),
                                 out / "samples.png": lambda file: file.write(_rendered(draw))})
    rate = len(samples) / stats["seconds"]
    return (f"wrote {len(samples)} samples to {npz} and {png} (weights: {module.weights}, sampler: {sampler.name}, "
            f"{sampler.steps_for(module.formulation)} steps, guidance {guidance:g}, NFE: {stats['nfe']}, "
            f"{rate:.1f} images/s)")


def _outputs(module, samples: torch.Tensor, labels: torch.Tensor | None) -> tuple[dict, Callable[[Path], Any]]:
    """The arrays of ``samples.npz`` (``images`` uint8 ``[N, C, H, W]`` or 2-D ``samples`` float ``[N, D]``;
    ``labels`` long ``[N]``) and ``draw(path)``, which writes ``samples.png``: a grid of the first 64 images or a
    scatter of the points."""
    if samples.ndim == 4:
        images = to_uint8(samples, module.data_transform)
        arrays = {"images": images.numpy()}
        draw = partial(save_image_grid, images[:64])
    else:
        arrays = {"samples": samples.numpy()}
        draw = partial(save_scatter, samples, title=module.formulation.name)
    if labels is not None:
        arrays["labels"] = labels.numpy()
    return arrays, draw


def _rendered(draw: Callable[[Path], Any]) -> bytes:
    """The bytes of the PNG that ``draw(path)`` writes (``save_image_grid`` and ``save_scatter`` take a path,
    not a file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "samples.png"
        draw(path)
        return path.read_bytes()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "sample")  # every '+key' read, numbers and choices valid: before any work
    try:
        line = sample(cfg)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; atomic_write_all left out= as it was
        print(f"interrupted: nothing was written to {cfg.out}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: the status a shell gives a command stopped by Ctrl-C
    print(line)


if __name__ == "__main__":
    main()

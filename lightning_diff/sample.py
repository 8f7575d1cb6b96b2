"""``lightning-diff sample``: generate images from a checkpoint with any sampler (``configs/sample.yaml``).

Writes ``out/samples.npz`` (``images`` uint8 ``[N, C, H, W]`` rounded as EDM writes PNGs, ``labels`` when
conditional; 2-D data: ``samples`` float ``[N, D]``) and ``out/samples.png``; prints NFE and images/s.
The same seed gives the same images whatever the batch size.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from .builders import load_module
from .callbacks.sample_grid import save_image_grid, save_scatter
from .data.transforms import EDM_PIXELS, to_uint8
from .train import CONFIG_DIR

__all__ = ["generate", "resolve_device", "main"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:i]``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def generate(module, seeds, *, batch_size: int, sampler: str, steps: int, options: dict, guidance: float = 1.0,
             class_label: int | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Sample ``len(seeds)`` items in batches; returns ``(samples float [N, ...], labels [N] or None, stats)``
    with ``stats = {"nfe": per-sample network evaluations, "seconds": wall time}``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; allowed: an integer >= 1")
    seeds = list(seeds)
    num_classes = getattr(module, "num_classes", 0) if module.conditional else 0
    labels = None
    if num_classes:
        labels = torch.tensor([class_label if class_label is not None else s % num_classes for s in seeds])
    out, stats, start = [], {}, time.perf_counter()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"sampling ({sampler}, {steps} steps)", total=len(seeds))
        for i in range(0, len(seeds), batch_size):
            batch_labels = None if labels is None else labels[i:i + batch_size]
            out.append(module.sample(seeds[i:i + batch_size], labels=batch_labels, sampler=sampler, steps=steps,
                                     guidance=guidance, stats=stats, **options).cpu())
            bar.advance(task, len(out[-1]))
    return torch.cat(out), labels, {"nfe": stats.get("nfe"), "seconds": time.perf_counter() - start}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    module = load_module(cfg.ckpt, weights=cfg.weights).to(resolve_device(cfg.device))
    seeds = range(cfg.seed, cfg.seed + cfg.num_samples)
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True)
    samples, labels, stats = generate(module, seeds, batch_size=cfg.batch_size, sampler=cfg.sampler.name,
                                      steps=cfg.steps, options=options, guidance=cfg.guidance,
                                      class_label=cfg.class_label)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": samples.numpy()} if samples.ndim == 2 else {}
    if samples.ndim == 4:
        transform = getattr(module, "data_transform", None) or EDM_PIXELS
        images = to_uint8(samples, transform)
        arrays["images"] = images.numpy()
        save_image_grid(images[:64], out / "samples.png")
    else:
        save_scatter(samples, out / "samples.png", title=module.formulation.name)
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(out / "samples.npz", **arrays)
    rate = len(samples) / stats["seconds"]
    print(f"wrote {len(samples)} samples to {out / 'samples.npz'} and {out / 'samples.png'} "
          f"(weights: {module.weights}, sampler: {cfg.sampler.name}, NFE: {stats['nfe']}, {rate:.1f} images/s)")


if __name__ == "__main__":
    main()

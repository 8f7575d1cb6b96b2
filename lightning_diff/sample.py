"""``lightning-diff sample``: generate images from a checkpoint with any sampler (``configs/sample.yaml``).

Writes ``out/samples.npz`` (``images`` uint8 ``[N, C, H, W]`` rounded as EDM writes PNGs, ``labels`` when
conditional; 2-D data: ``samples`` float ``[N, D]``) and ``out/samples.png``; prints NFE and images/s.
The same seed gives the same images whatever ``sampler.batch_size``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from .builders import load_module, pretrained_flags, resolve_device
from .callbacks.sample_grid import save_image_grid, save_scatter
from .classifier import classifier_from_config
from .config import CONFIG_DIR
from .data.transforms import to_uint8
from .evaluation import generate
from .evaluation.analytic_moments import with_moments
from .module import SamplerSettings

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    module = load_module(cfg.ckpt, weights=cfg.weights, pretrained=pretrained_flags(cfg.pretrained))
    module = module.to(resolve_device(cfg.device))
    sampler = SamplerSettings.from_config(cfg.sampler)
    sampler = with_moments(sampler, module, **cfg.analytic_dpm).check(module.formulation)  # ddpm variance=analytic
    seeds = range(cfg.seed, cfg.seed + cfg.num_samples)
    classifier, scale = classifier_from_config(cfg.classifier, module.formulation)  # classifier guidance
    samples, labels, stats = generate(module, seeds, sampler=sampler, guidance=cfg.guidance,
                                      class_label=cfg.class_label, seed_protocol=cfg.seed_protocol,
                                      classifier=None if classifier is None else classifier.to(module.device),
                                      classifier_scale=scale)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": samples.numpy()} if samples.ndim == 2 else {}
    if samples.ndim == 4:
        images = to_uint8(samples, module.data_transform)
        arrays["images"] = images.numpy()
        save_image_grid(images[:64], out / "samples.png")
    else:
        save_scatter(samples, out / "samples.png", title=module.formulation.name)
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(out / "samples.npz", **arrays)
    rate = len(samples) / stats["seconds"]
    print(f"wrote {len(samples)} samples to {out / 'samples.npz'} and {out / 'samples.png'} (weights: "
          f"{module.weights}, sampler: {sampler.name}, {sampler.steps_for(module.formulation)} steps, NFE: "
          f"{stats['nfe']}, {rate:.1f} images/s)")


if __name__ == "__main__":
    main()

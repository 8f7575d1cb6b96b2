"""``lightning-diff sample``: generate images from a checkpoint with any sampler (``configs/sample.yaml``).

Writes ``out/samples.npz`` (``images`` uint8 ``[N, C, H, W]`` rounded as EDM writes PNGs, ``labels`` int64 when
conditional; 2-D data: ``samples`` float32 ``[N, D]``: the layout of ``callbacks.sample_grid.write_samples``, which
the training run's sample grid writes too) and ``out/samples.png``; prints NFE and images/s.
The same seed gives the same images whatever ``sampler.batch_size``. Both files are written atomically as one
unit, ``out=`` is checked for writing before any sampling, progress goes to plain lines when stdout is not a
terminal, and Ctrl-C exits with status 130 and one line.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ..callbacks.sample_grid import write_samples
from ..checkpoint_io import check_writable
from ..config import CONFIG_DIR
from ..evaluation import generate
from ..evaluation.analytic_moments import with_moments
from ..methods.classifier import classifier_from_config
from ..sampling import SamplerSettings
from ..training.builders import load_module, pretrained_flags, resolve_device
from .config_check import check_command
from .renamed import accepts_renamed_keys

__all__ = ["main", "sample"]


def sample(cfg: DictConfig) -> str:
    """Run ``cfg`` (``configs/sample.yaml``): sample and write ``out/samples.npz`` and ``out/samples.png``, as one
    unit (an earlier pair stays whole until both new files are on the disk). ``out=`` is checked before any work.
    Returns the line ``main`` prints (the paths, weights, sampler, NFE and images/s)."""
    out = check_writable(cfg.out, f"out={cfg.out}")  # a read-only out= fails now, not after the sampling
    module = load_module(cfg.ckpt, weights=cfg.weights, pretrained=pretrained_flags(cfg.pretrained))
    module = module.to(resolve_device(cfg.device))
    # null: the checkpoint's own
    sampler, guidance = SamplerSettings.of_run(module.run_config, cfg.sampler, cfg.guidance)
    sampler = with_moments(sampler, module, **cfg.analytic_dpm)  # ddpm variance=analytic
    sampler = sampler.check(module.formulation, denoiser=module.denoiser)  # a tuned grid of another model: warned
    seeds = range(cfg.seed, cfg.seed + cfg.num_samples)
    classifier, scale = classifier_from_config(cfg.classifier, module.formulation)  # classifier guidance
    samples, labels, stats = generate(module, seeds, sampler=sampler, guidance=guidance,
                                      class_label=cfg.class_label, seed_protocol=cfg.seed_protocol,
                                      classifier=None if classifier is None else classifier.to(module.device),
                                      classifier_scale=scale)
    npz, png = write_samples(out, samples, labels, data_transform=module.data_transform,
                             title=module.formulation.name)
    rate = len(samples) / stats["seconds"]
    return (f"wrote {len(samples)} samples to {npz} and {png} (weights: {module.weights}, sampler: {sampler.name}, "
            f"{sampler.steps_for(module.formulation)} steps, guidance {guidance}, NFE: {stats['nfe']}, "
            f"{rate:.1f} images/s)")


@accepts_renamed_keys("sample")  # sampler.time_steps.<key>=... without a '+'
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

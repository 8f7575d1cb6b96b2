"""``lightning-diff tune-steps``: the sigma grid of a deterministic sampler at a budget of network evaluations, tuned
for one model (``configs/tune-steps.yaml``; the method: ``sampling.tuned_grid``, docs/tune_steps.md).

Writes ``out`` (JSON, atomically, ``sampling.grid_file``) that ``sample`` and ``evaluate`` run on with
``sampler.time_steps={file: out}``; their records carry its sigmas and key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ..checkpoint_io import check_writable
from ..config import CONFIG_DIR
from ..evaluation import generate
from ..sampling import SamplerSettings
from ..sampling.analytic_dpm import fingerprint
from ..sampling.grid_file import write_grid_file
from ..sampling.tuned_grid import Sample, tune_grid
from ..training.builders import load_module, pretrained_flags, resolve_device
from .config_check import check_command

__all__ = ["main", "model_record", "module_sampler", "summary", "tune_steps"]


def tune_steps(cfg: DictConfig) -> dict:
    """Run ``cfg`` (``configs/tune-steps.yaml``): load the model, tune the grid of ``cfg.sampler`` at ``cfg.nfe``
    on the tuning seeds (``sampling.tuned_grid.tune_grid``) and write it with the model's ``ckpt``, ``weights``,
    formulation and fingerprint (sha256 of its weights, ``analytic_dpm.fingerprint``) to ``cfg.out``. ``out``'s
    folder is checked before any work. Returns the file's content."""
    check_writable(Path(cfg.out).parent, f"out={cfg.out}")
    module = load_module(cfg.ckpt, weights=cfg.weights, pretrained=pretrained_flags(cfg.pretrained))
    module = module.to(resolve_device(cfg.device))
    settings, _ = SamplerSettings.of_run(module.run_config, cfg.sampler)  # null: the model's own sampler
    settings = dataclasses.replace(settings, steps=None, time_steps=None)  # the grid is what is tuned
    tuning = range(cfg.seed, cfg.seed + cfg.num_seeds)
    content = tune_grid(module_sampler(module), settings, cfg.nfe, formulation=module.formulation, seeds=tuning,
                        heldout_seeds=range(tuning.stop, tuning.stop + cfg.heldout_seeds),
                        reference_steps=cfg.reference_steps, rho=cfg.rho, max_evals=cfg.max_evals)
    return write_grid_file(cfg.out, {**content, "model": model_record(module, cfg.ckpt)})


def module_sampler(module) -> Sample:
    """``tuned_grid.Sample`` of a ``DiffusionModule``: ``evaluation.generate`` (batches of the settings'
    ``batch_size``, a conditional model's labels ``seed % num_classes``, no guidance), without progress lines."""
    def sample(settings: SamplerSettings, seeds) -> tuple[torch.Tensor, int]:
        samples, _, stats = generate(module, seeds, sampler=settings, progress=False)
        return samples, stats["nfe"]

    return sample


def model_record(module, ckpt: str) -> dict:
    """The grid file's ``model``: the checkpoint, its weights (ema or raw), formulation and fingerprint (the sha256 of
    the weights and buffers, ``analytic_dpm.fingerprint``)."""
    return {"ckpt": str(ckpt), "weights": module.weights, "formulation": module.formulation.name,
            "fingerprint": fingerprint(module.denoiser, torch.zeros(0), {})}


def summary(content: dict, out: str) -> str:
    """The lines ``main`` prints: the grid, its losses against the initial one, and the command that samples on it."""
    loss, method, name = content["loss"], content["method"], content["sampler"]["name"]
    lines = [f"tuned {content['steps']} steps of sampler={name} at NFE {content['nfe']} in {method['evaluations']} "
             f"evaluations -> {out} (key {content['key'][:12]})",
             f"sigmas: {[float(f'{s:.6g}') for s in content['sigmas']]}"]
    for seeds, values in loss.items():
        if values is not None:
            lines.append(f"endpoint MSE on {len(method['seeds'][seeds])} {seeds} seeds: {values['tuned']:.4g} "
                         f"(EDM's time steps, rho={content['initial']['rho']:g}: {values['initial']:.4g})")
    lines.append(f"sample on it: lightning-diff sample ckpt={content['model']['ckpt']} sampler={name} "
                 f"'sampler.time_steps={{file:{out}}}'")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="tune-steps")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "tune-steps")  # every '+key' read, numbers and choices valid: before any work
    print(summary(tune_steps(cfg), cfg.out))


if __name__ == "__main__":
    main()

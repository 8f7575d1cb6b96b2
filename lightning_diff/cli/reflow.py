"""``lightning-diff reflow``: draw and save the couplings of a trained rectified flow (``configs/reflow.yaml``; the
method: ``methods.reflow``, its objective ``objectives.reflow``)."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from .. import sampling
from ..config import CONFIG_DIR
from ..methods.reflow import draw_couplings, empirical_w2, save_couplings, straightness
from ..sampling import SamplerSettings
from ..training.builders import load_module, resolve_device
from .config_check import check_command
from .renamed import accepts_renamed_keys

__all__ = ["main"]


@accepts_renamed_keys("reflow")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="reflow")
def main(cfg: DictConfig) -> None:
    """``lightning-diff reflow ckpt=PATH num_samples=N out=FILE``: draw and save the coupling of a trained model,
    and print the straightness (eq. 1) and the 1-step W2 to the pairs of the model it drew from."""
    check_command(cfg, "reflow")  # every '+key' read, numbers and choices valid: before any work
    module = load_module(cfg.ckpt, weights=cfg.weights).to(resolve_device(cfg.device))
    if module.conditional:
        raise ValueError(f"reflow: ckpt={cfg.ckpt} is a conditional model; allowed: an unconditional one (the "
                         "pairs carry no labels)")
    sampler = SamplerSettings.from_config(cfg.sampler).check(module.formulation)
    seeds = range(cfg.seed, cfg.seed + cfg.num_samples)
    pairs = draw_couplings(module.denoiser, seeds, module.data_shape, sampler, module.formulation,
                           device=module.device, source=str(cfg.ckpt), data_transform=module.data_transform)
    save_couplings(pairs, cfg.out)
    count = min(cfg.straightness.num_samples, cfg.num_samples)
    noise = pairs.noise[:count].to(module.device)
    value, _ = straightness(module.denoiser, noise, steps=cfg.straightness.steps,
                            t_max=getattr(module.formulation, "t_max", 1 - 1e-3))
    with torch.no_grad():  # one Euler step from t_max: D(sigma_max z; sigma_max)
        one_step = sampling.euler(module.denoiser, module.formulation.sigma_max * noise,
                                  torch.tensor([module.formulation.sigma_max, 0.0], device=module.device)).cpu()
    print(f"wrote {cfg.num_samples} pairs to {cfg.out} (key {str(pairs.record['key'])[:12]}, sampler {sampler.name}, "
          f"{sampler.steps_for(module.formulation)} steps); straightness S = {float(value.mean()):.4g} "
          f"(+- {float(value.std() / count**0.5):.2g}, {count} trajectories, {cfg.straightness.steps} Euler "
          f"steps); 1-step Euler W2 to the pairs' samples: {empirical_w2(one_step, pairs.samples[:count]):.4g}")


if __name__ == "__main__":
    main()

"""``lightning-diff evaluate``: FID/IS/KID/precision-recall and bits/dim of a checkpoint (``configs/evaluate.yaml``).

``lightning-diff evaluate ckpt=PATH metrics=[fid,is,kid,pr,bpd,vlb]`` loads the checkpoint (EMA weights by
default), rebuilds the run's data module from the config stored in it, generates ``metrics.num_images``
images with per-sample seeds, scores them against cached statistics of the reference split, computes
bits/dim on the test split (val when there is none), writes ``<ckpt dir>/eval-<name>.json`` (numbers and
protocol) and prints a one-line summary. The work is done by ``lightning_diff.evaluation``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from .builders import build_datamodule, load_module, resolve_device
from .config import CONFIG_DIR
from .evaluation import (
    SAMPLE_METRICS,
    require_discrete,
    sample_quality,
    selected_metrics,
    split_bits_per_dim,
    split_vlb,
    summary_line,
    write_record,
)
from .module import SamplerSettings

__all__ = ["evaluate", "main"]


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation ``cfg`` (``configs/evaluate.yaml``) and write its JSON; returns the record
    ``{"checkpoint", "metrics", "protocol", "config", "path"}``."""
    names = selected_metrics(cfg.metrics)
    module = load_module(cfg.ckpt, weights=cfg.weights).to(resolve_device(cfg.device))
    if "vlb" in names:
        require_discrete(module.formulation)  # before any other work
    sampler = SamplerSettings.from_config(cfg.sampler).check(module.formulation)
    if (module.run_config or {}).get("data") is None:
        raise ValueError(f"ckpt={cfg.ckpt}: its run_config has no data section to rebuild the data module from")
    datamodule = build_datamodule(OmegaConf.create(module.run_config))
    options = {m: OmegaConf.to_container(cfg.metrics[m], resolve=True) for m in names}
    results, protocol = {}, {"weights": module.weights}
    if set(names) & set(SAMPLE_METRICS):
        m = cfg.metrics
        values, protocol["samples"] = sample_quality(
            module, datamodule, names, num_images=m.num_images, weights=module.weights, sampler=sampler,
            guidance=cfg.guidance, seed=cfg.seed, seed_sets=m.seed_sets, reference=m.reference,
            reference_num_images=m.reference_num_images, inception_weights=m.inception_weights,
            batch_size=m.batch_size, cache_dir=m.cache_dir,
            options={k: v for k, v in options.items() if k in SAMPLE_METRICS}, progress=cfg.progress)
        results.update(values)
    if "bpd" in names:
        values, protocol["bpd"] = split_bits_per_dim(module, datamodule, seed=cfg.seed, progress=cfg.progress,
                                                     **options["bpd"])
        results.update(values)
    if "vlb" in names:
        values, protocol["vlb"] = split_vlb(module, datamodule, seed=cfg.seed, progress=cfg.progress, **options["vlb"])
        results.update(values)
    return write_record(cfg.ckpt, results, protocol, OmegaConf.to_container(cfg, resolve=True), name=cfg.name)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    print(summary_line(evaluate(cfg)))


if __name__ == "__main__":
    main()

